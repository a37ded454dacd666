{{/*
Chart name, truncated to 63 characters (the DNS label limit).
Usage: {{ include "qwen-serve.name" . }}
*/}}
{{- define "qwen-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: <release>-<chart> unless the release name already contains the chart name.
Truncated to 63 characters because some Kubernetes name fields are limited to that.
Usage: {{ include "qwen-serve.fullname" . }}
*/}}
{{- define "qwen-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, as used by the helm.sh/chart label.
Usage: {{ include "qwen-serve.chart" . }}
*/}}
{{- define "qwen-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: name and instance only. They go into immutable Deployment selectors, so nothing
user-supplied (commonLabels, podLabels) may ever be added here.
Usage: {{ include "qwen-serve.selectorLabels" . }}
*/}}
{{- define "qwen-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qwen-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the Service exposing only the metrics port (the ServiceMonitor's target; never the Ingress's).
Usage: {{ include "qwen-serve.metricsServiceName" . }}
*/}}
{{- define "qwen-serve.metricsServiceName" -}}
{{- printf "%s-metrics" (include "qwen-serve.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/*
Labels of the metrics Service: the standard ones with component `metrics`, so the ServiceMonitor can
select it and not the traffic Service (whose component is `inference`).
Usage: {{ include "qwen-serve.metricsLabels" . }}
*/}}
{{- define "qwen-serve.metricsLabels" -}}
{{- include "qwen-serve.labels" . | replace "app.kubernetes.io/component: inference" "app.kubernetes.io/component: metrics" }}
{{- end }}

{{/*
Standard labels for every object: selector labels plus chart, version, component, part-of, managed-by
and the user's commonLabels.
Usage: {{ include "qwen-serve.labels" . }}
*/}}
{{- define "qwen-serve.labels" -}}
helm.sh/chart: {{ include "qwen-serve.chart" . }}
{{ include "qwen-serve.selectorLabels" . }}
{{- with .Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
app.kubernetes.io/component: inference
app.kubernetes.io/part-of: qwen-serve
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Name of the ServiceAccount the pod runs as.
Usage: {{ include "qwen-serve.serviceAccountName" . }}
*/}}
{{- define "qwen-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qwen-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The container image reference; the tag defaults to the chart's appVersion. A tag starting with
"sha256:" is treated as a digest.
Usage: {{ include "qwen-serve.image" . }}
*/}}
{{- define "qwen-serve.image" -}}
{{- $tag := default .Chart.AppVersion (toString .Values.image.tag) }}
{{- if hasPrefix "sha256:" $tag }}
{{- printf "%s@%s" .Values.image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the keys file (existing or chart-managed).
Usage: {{ include "qwen-serve.keysSecretName" . }}
*/}}
{{- define "qwen-serve.keysSecretName" -}}
{{- default (printf "%s-keys" (include "qwen-serve.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/*
Name of the PVC holding the model cache (existing or chart-managed).
Usage: {{ include "qwen-serve.modelCacheClaim" . }}
*/}}
{{- define "qwen-serve.modelCacheClaim" -}}
{{- default (printf "%s-model-cache" (include "qwen-serve.fullname" .)) .Values.modelCache.existingClaim }}
{{- end }}

{{/*
Where things live inside the pod. The config path is the one `qwen-serve up --config` reads; the keys
directory is a whole-Secret mount (no subPath) so a rotated Secret reaches the pod.
*/}}
{{- define "qwen-serve.configPath" -}}/etc/qwen-serve/config.yaml{{- end }}
{{- define "qwen-serve.keysDir" -}}/etc/qwen-serve/keys{{- end }}
{{- define "qwen-serve.modelDir" -}}/models{{- end }}

{{/*
The qwen-serve YAML config (`qwen_serve/config.py`) rendered from the values, as YAML. Only keys the config
loader accepts: tests load this output with qwen_serve.config.parse_config and plan it with build_plan.
`extraConfig` is deep-merged over the rendered sections.
Usage: {{ include "qwen-serve.config" . }}
*/}}
{{- define "qwen-serve.config" -}}
{{- $v := .Values }}
{{- $model := dict "source" (required "Value 'model.source' must be defined !" $v.model.source) "tool_calling" $v.model.toolCalling }}
{{- with $v.model.servedName }}{{ $_ := set $model "served_name" . }}{{ end }}
{{- with $v.model.maxModelLen }}{{ $_ := set $model "max_model_len" (int .) }}{{ end }}
{{- $engine := dict
      "device" $v.engine.device
      "gpus" (int $v.engine.gpus)
      "tensor_parallel_size" (ternary $v.engine.tensorParallelSize (int $v.engine.tensorParallelSize) (kindIs "string" $v.engine.tensorParallelSize))
      "data_parallel_size" (ternary $v.engine.dataParallelSize (int $v.engine.dataParallelSize) (kindIs "string" $v.engine.dataParallelSize))
      "gpu_memory_utilization" $v.engine.gpuMemoryUtilization
      "kv_cache_dtype" $v.engine.kvCacheDtype
      "startup_timeout_s" $v.engine.startupTimeoutSeconds
      "extra_args" (default list $v.engine.extraArgs) }}
{{- $gateway := dict
      "host" "0.0.0.0"
      "port" 8080
      "drain_timeout_s" $v.gateway.drainTimeoutSeconds
      "request_timeout_s" $v.gateway.requestTimeoutSeconds
      "max_request_bytes" (int $v.gateway.maxRequestBytes)
      "metrics_port" (int (required "Value 'gateway.metricsPort' must be defined !" $v.gateway.metricsPort))
      "engine_metrics_cache_s" $v.gateway.engineMetricsCacheSeconds
      "ui" $v.gateway.ui }}
{{- $auth := dict "enabled" $v.auth.enabled "reload_interval_s" $v.auth.reloadIntervalSeconds }}
{{- if $v.auth.enabled }}
{{- $_ := set $auth "keys_file" (printf "%s/%s" (include "qwen-serve.keysDir" .) $v.auth.secretKey) }}
{{- end }}
{{- $config := dict "model" $model "engine" $engine "gateway" $gateway "auth" $auth }}
{{- $config = mustMergeOverwrite $config (deepCopy (default dict $v.extraConfig)) }}
{{- toYaml $config }}
{{- end }}

{{/*
Render-time checks that a JSON schema cannot express (relations between values). Each fails with a
message naming the values at fault.
Usage: {{ include "qwen-serve.validate" . }}
*/}}
{{- define "qwen-serve.validate" -}}
{{- $v := .Values }}
{{- $tp := $v.engine.tensorParallelSize }}
{{- $dp := $v.engine.dataParallelSize }}
{{- if and (not (kindIs "string" $tp)) (gt (int $tp) (int $v.engine.gpus)) }}
{{- fail (printf "engine.tensorParallelSize=%d exceeds engine.gpus=%d" (int $tp) (int $v.engine.gpus)) }}
{{- end }}
{{- if and (not (kindIs "string" $tp)) (not (kindIs "string" $dp)) (gt (mul (int $tp) (int $dp)) (int $v.engine.gpus)) }}
{{- fail (printf "engine.tensorParallelSize × engine.dataParallelSize = %d exceeds engine.gpus=%d" (mul (int $tp) (int $dp)) (int $v.engine.gpus)) }}
{{- end }}
{{- $needed := add (int $v.lifecycle.preStopSleepSeconds) (int $v.gateway.drainTimeoutSeconds) }}
{{- if le (int $v.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds=%d must exceed lifecycle.preStopSleepSeconds + gateway.drainTimeoutSeconds = %d, or Kubernetes kills the pod while streams are still draining" (int $v.terminationGracePeriodSeconds) $needed) }}
{{- end }}
{{- $extra := default dict $v.extraConfig }}
{{- if hasKey (default dict $extra.engine) "gpus" }}
{{- fail "extraConfig.engine.gpus: set engine.gpus instead (it also sets the pod's GPU limit)" }}
{{- end }}
{{- if or (hasKey (default dict $extra.gateway) "port") (hasKey (default dict $extra.gateway) "host") }}
{{- fail "extraConfig.gateway.port/host: the chart fixes the gateway at 0.0.0.0:8080 (container port, probes, Service)" }}
{{- end }}
{{- if hasKey (default dict $extra.gateway) "metrics_port" }}
{{- fail "extraConfig.gateway.metrics_port: set gateway.metricsPort instead (it also sets the container port, the metrics Service and the ServiceMonitor)" }}
{{- end }}
{{- if eq (int $v.gateway.metricsPort) 8080 }}
{{- fail "gateway.metricsPort=8080 is the gateway's traffic port; pick another (metrics must not share the port the Service and Ingress expose)" }}
{{- end }}
{{- if hasKey (default dict $extra.auth) "keys_file" }}
{{- fail "extraConfig.auth.keys_file: the chart points it into the mounted Secret; set auth.existingSecret / auth.secretKey instead" }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas=%d exceeds autoscaling.maxReplicas=%d" (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- end }}
{{- end }}
