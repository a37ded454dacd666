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
Labels of the pod template: selector labels plus component, part-of, managed-by and the user's
commonLabels. No helm.sh/chart and no app.kubernetes.io/version: any change to the pod template restarts
every GPU pod, so a chart-only change (a new chart version, a dashboard) must leave it byte-identical.
Usage: {{ include "qwen-serve.podTemplateLabels" . }}
*/}}
{{- define "qwen-serve.podTemplateLabels" -}}
{{ include "qwen-serve.selectorLabels" . }}
app.kubernetes.io/component: inference
app.kubernetes.io/part-of: qwen-serve
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Standard labels for every object's metadata: the pod template labels plus chart and version.
Usage: {{ include "qwen-serve.labels" . }}
*/}}
{{- define "qwen-serve.labels" -}}
helm.sh/chart: {{ include "qwen-serve.chart" . }}
{{- with .Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
{{ include "qwen-serve.podTemplateLabels" . }}
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
A name NOTES suggests for a Secret the user creates for the keys: `<fullname>-api-keys`. No chart-managed
object has that name (the chart's own keys Secret is `<fullname>-keys`), so following NOTES never collides
with, or on a later upgrade deletes, an object Helm owns.
Usage: {{ include "qwen-serve.userKeysSecretName" . }}
*/}}
{{- define "qwen-serve.userKeysSecretName" -}}
{{- printf "%s-api-keys" (include "qwen-serve.fullname" .) }}
{{- end }}

{{/*
Access modes of the model cache claim as a JSON list: those of the live claim named by
modelCache.existingClaim when `lookup` finds it (a cluster-aware render), else modelCache.accessMode.
An empty list when the cache is an emptyDir (modelCache.enabled false).
Usage: {{ include "qwen-serve.cacheAccessModes" . | fromJsonArray }}
*/}}
{{- define "qwen-serve.cacheAccessModes" -}}
{{- if not .Values.modelCache.enabled }}
{{- list | toJson }}
{{- else }}
{{- $modes := list .Values.modelCache.accessMode }}
{{- with .Values.modelCache.existingClaim }}
{{- $claim := lookup "v1" "PersistentVolumeClaim" $.Release.Namespace . }}
{{- $live := dig "spec" "accessModes" list $claim }}
{{- if $live }}{{ $modes = $live }}{{ end }}
{{- end }}
{{- toJson $modes }}
{{- end }}
{{- end }}

{{/*
The Deployment strategy, as YAML. `updateStrategy: {}` is auto: no surge (maxSurge 0, maxUnavailable 1)
with one replica or a single-node cache (ReadWriteOnce, ReadWriteOncePod without ReadWriteMany), where a
surge pod needs engine.gpus more free GPUs (and the volume's node) and stalls the rollout; a surge of one
with several replicas and a multi-node cache or none. An explicit strategy is used as given, after the
same check: a surge with a single-node cache fails the render, naming the values.
Usage: {{ include "qwen-serve.strategy" . }}
*/}}
{{- define "qwen-serve.strategy" -}}
{{- $v := .Values }}
{{- $modes := include "qwen-serve.cacheAccessModes" . | fromJsonArray }}
{{- $oneNode := and (not (has "ReadWriteMany" $modes)) (or (has "ReadWriteOnce" $modes) (has "ReadWriteOncePod" $modes)) }}
{{- $replicas := int (ternary $v.autoscaling.minReplicas $v.replicaCount $v.autoscaling.enabled) }}
{{- $strategy := dict }}
{{- if not $v.updateStrategy }}
{{- if and (gt $replicas 1) (not $oneNode) }}
{{- $strategy = dict "type" "RollingUpdate" "rollingUpdate" (dict "maxSurge" 1 "maxUnavailable" 0) }}
{{- else }}
{{- $strategy = dict "type" "RollingUpdate" "rollingUpdate" (dict "maxSurge" 0 "maxUnavailable" 1) }}
{{- end }}
{{- else if eq (default "RollingUpdate" $v.updateStrategy.type) "Recreate" }}
{{- /* Helm merges user maps into the defaults: a rollingUpdate block means nothing under Recreate. */}}
{{- $strategy = dict "type" "Recreate" }}
{{- else }}
{{- $rolling := deepCopy (default dict $v.updateStrategy.rollingUpdate) }}
{{- /* Kubernetes defaults both to 25%, which rounds a surge up to one pod. */}}
{{- $surge := ternary (toString $rolling.maxSurge) "25%" (hasKey $rolling "maxSurge") }}
{{- $unavailable := ternary (toString $rolling.maxUnavailable) "25%" (hasKey $rolling "maxUnavailable") }}
{{- $surgeZero := regexMatch "^0+%?$" $surge }}
{{- if and $surgeZero (regexMatch "^0+%?$" $unavailable) }}
{{- fail "updateStrategy.rollingUpdate: maxSurge and maxUnavailable are both 0, so no pod can ever be replaced; set maxUnavailable: 1 (or leave updateStrategy: {} for auto)" }}
{{- end }}
{{- if and $oneNode (not $surgeZero) }}
{{- $cache := printf "modelCache.accessMode=%s" $v.modelCache.accessMode }}
{{- if $v.modelCache.existingClaim }}
{{- $cache = printf "modelCache.existingClaim=%s with access modes %s" $v.modelCache.existingClaim (join "," $modes) }}
{{- end }}
{{- fail (printf "updateStrategy.rollingUpdate.maxSurge=%s with a single-node model cache (%s): the surge pod needs %d more %s on the node that holds the volume, so it stays Pending (or hits Multi-Attach) and the rollout never finishes. Set maxSurge: 0 and maxUnavailable: 1, type: Recreate, updateStrategy: {} (auto), or a ReadWriteMany cache" $surge $cache (int $v.engine.gpus) $v.engine.gpuResourceName) }}
{{- end }}
{{- $strategy = dict "type" "RollingUpdate" "rollingUpdate" $rolling }}
{{- end }}
{{- toYaml $strategy }}
{{- end }}

{{/*
engine.startupTimeoutSeconds in whole seconds. `auto`: from the size of a known model.source, a bundled
preset name or its Hugging Face id in any case (the presets of qwen_serve/presets.py): 1800 s for 0.5B to
7B, 3600 s for 14B and 32B, 7200 s for 72B (about 150 GB to download) and for any other source, whose size
the chart cannot know. A number is rounded up.
Usage: {{ include "qwen-serve.startupTimeoutSeconds" . | int }}
*/}}
{{- define "qwen-serve.startupTimeoutSeconds" -}}
{{- $value := .Values.engine.startupTimeoutSeconds }}
{{- if eq (toString $value) "auto" }}
{{- $known := dict "qwen2.5-0.5b-instruct" 1800 "qwen2.5-1.5b-instruct" 1800 "qwen2.5-3b-instruct" 1800 "qwen2.5-7b-instruct" 1800 "qwen2.5-14b-instruct" 3600 "qwen2.5-32b-instruct" 3600 "qwen2.5-72b-instruct" 7200 }}
{{- get $known (lower .Values.model.source | trimPrefix "qwen/") | default 7200 }}
{{- else }}
{{- int (ceil $value) }}
{{- end }}
{{- end }}

{{/*
The Deployment's progressDeadlineSeconds. `auto`: the longer of engine.startupTimeoutSeconds and the
startup probe window (a first start downloads the weights), plus terminationGracePeriodSeconds (without a
surge the old pod drains before its replacement starts), plus 900 s for scheduling, volume attach and the
image pull. An integer value is used as given. NOTES' `rollout status --timeout` prints the same figure.
Usage: {{ include "qwen-serve.progressDeadlineSeconds" . }}
*/}}
{{- define "qwen-serve.progressDeadlineSeconds" -}}
{{- $v := .Values }}
{{- if eq (toString $v.progressDeadlineSeconds) "auto" }}
{{- $probe := default dict $v.probes.startup }}
{{- $window := add (mul (int (default 10 $probe.periodSeconds)) (int (default 3 $probe.failureThreshold))) (int (default 0 $probe.initialDelaySeconds)) }}
{{- $startup := max (int (include "qwen-serve.startupTimeoutSeconds" .)) $window }}
{{- add $startup (int $v.terminationGracePeriodSeconds) 900 }}
{{- else }}
{{- int $v.progressDeadlineSeconds }}
{{- end }}
{{- end }}

{{/*
Whether model.source is a directory in the pod (an absolute path, e.g. on the model cache volume):
nothing to download, and the engine runs with HF_HUB_OFFLINE=1. "true" or empty.
Usage: {{ if include "qwen-serve.localModel" . }}
*/}}
{{- define "qwen-serve.localModel" -}}
{{- if hasPrefix "/" .Values.model.source }}true{{ end }}
{{- end }}

{{/*
Whether the pod runs the download init container: modelCache.predownload and a hub (or preset) source.
"true" or empty.
Usage: {{ if include "qwen-serve.predownload" . }}
*/}}
{{- define "qwen-serve.predownload" -}}
{{- if and .Values.modelCache.predownload (not (include "qwen-serve.localModel" .)) }}true{{ end }}
{{- end }}

{{/*
HF_TOKEN from hfToken.existingSecret, as container env entries (nothing when unset).
Usage: {{ include "qwen-serve.hfTokenEnv" . | nindent 12 }}
*/}}
{{- define "qwen-serve.hfTokenEnv" -}}
{{- with .Values.hfToken.existingSecret -}}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.hfToken.key }}
{{- end }}
{{- end }}

{{/*
A Kubernetes quantity ("200Gi", "1.5T", "500000000") in bytes, as a float, for comparing sizes.
Usage: {{ include "qwen-serve.quantityBytes" "200Gi" | float64 }}
*/}}
{{- define "qwen-serve.quantityBytes" -}}
{{- $q := toString . | trim }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q }}
{{- $suffix := trimPrefix $number $q }}
{{- $scale := 1.0 }}
{{- if hasPrefix "e" $suffix }}
{{- range until (int (trimPrefix "e" $suffix)) }}{{ $scale = mulf $scale 10 }}{{ end }}
{{- else }}
{{- $units := dict "" 1.0 "m" 0.001 "k" 1000.0 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 }}
{{- $scale = get $units $suffix }}
{{- end }}
{{- mulf (float64 $number) $scale }}
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
{{- with $v.model.revision }}{{ $_ := set $model "revision" (toString .) }}{{ end }}
{{- with $v.model.servedName }}{{ $_ := set $model "served_name" . }}{{ end }}
{{- with $v.model.maxModelLen }}{{ $_ := set $model "max_model_len" (int .) }}{{ end }}
{{- $engine := dict
      "device" $v.engine.device
      "gpus" (int $v.engine.gpus)
      "tensor_parallel_size" (ternary $v.engine.tensorParallelSize (int $v.engine.tensorParallelSize) (kindIs "string" $v.engine.tensorParallelSize))
      "data_parallel_size" (ternary $v.engine.dataParallelSize (int $v.engine.dataParallelSize) (kindIs "string" $v.engine.dataParallelSize))
      "gpu_memory_utilization" $v.engine.gpuMemoryUtilization
      "kv_cache_dtype" $v.engine.kvCacheDtype
      "startup_timeout_s" (int (include "qwen-serve.startupTimeoutSeconds" .))
      "extra_args" (default list $v.engine.extraArgs) }}
{{- if $v.multinode.enabled }}
{{- /* One engine over multinode.nodes pods: the planner adds pipeline parallel over Ray. */}}
{{- $_ := set $engine "nodes" (int $v.multinode.nodes) }}
{{- end }}
{{- $gateway := dict
      "host" "0.0.0.0"
      "port" 8080
      "drain_timeout_s" $v.gateway.drainTimeoutSeconds
      "request_timeout_s" $v.gateway.requestTimeoutSeconds
      "max_request_bytes" (int $v.gateway.maxRequestBytes)
      "metrics_port" (int (required "Value 'gateway.metricsPort' must be defined !" $v.gateway.metricsPort))
      "engine_metrics_cache_s" $v.gateway.engineMetricsCacheSeconds
      "ui" $v.gateway.ui }}
{{- with $v.inferencePool }}{{ if .enabled }}
{{- /* The endpoint picker scrapes /metrics/engine every refreshInterval: a longer engine-scrape cache would
hand it stale queue and KV-cache figures, so the cache is capped at that interval. */}}
{{- $interval := toString .picker.refreshInterval }}
{{- $number := regexFind "^[0-9]+" $interval }}
{{- $scale := get (dict "ns" 1e-9 "us" 1e-6 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0) (trimPrefix $number $interval) }}
{{- $_ := set $gateway "engine_metrics_cache_s" (minf (float64 $v.gateway.engineMetricsCacheSeconds) (mulf (float64 $number) $scale)) }}
{{- end }}{{ end }}
{{- $auth := dict "enabled" $v.auth.enabled "reload_interval_s" $v.auth.reloadIntervalSeconds }}
{{- if $v.auth.enabled }}
{{- $_ := set $auth "keys_file" (printf "%s/%s" (include "qwen-serve.keysDir" .) $v.auth.secretKey) }}
{{- end }}
{{- $config := dict "model" $model "engine" $engine "gateway" $gateway "auth" $auth }}
{{- /* limits: only with limits.backend redis; with limits.existingSecret the init container limits-config adds
it (and the URL) at pod start, so this file stays a complete config without it (see _limits.tpl). */}}
{{- $limits := include "qwen-serve.limitsSection" . | fromJson }}
{{- if and $limits (not (include "qwen-serve.limitsFromSecret" .)) }}
{{- $_ := set $config "limits" $limits }}
{{- end }}
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
{{- with $v.probes.startup }}
{{- $window := add (mul (int (default 10 .periodSeconds)) (int (default 3 .failureThreshold))) (int (default 0 .initialDelaySeconds)) }}
{{- $timeout := int (include "qwen-serve.startupTimeoutSeconds" $) }}
{{- if lt $window $timeout }}
{{- fail (printf "probes.startup allows %d s (periodSeconds × failureThreshold + initialDelaySeconds), less than engine.startupTimeoutSeconds = %d s: Kubernetes would restart the container while the engine may still be starting. Raise probes.startup.failureThreshold to at least %d, or lower engine.startupTimeoutSeconds" $window $timeout (int (ceil (divf (sub $timeout (int (default 0 .initialDelaySeconds))) (int (default 10 .periodSeconds)))))) }}
{{- end }}
{{- end }}
{{- $extra := default dict $v.extraConfig }}
{{- if hasKey (default dict $extra.engine) "gpus" }}
{{- fail "extraConfig.engine.gpus: set engine.gpus instead (it also sets the pod's GPU limit)" }}
{{- end }}
{{- if hasKey (default dict $extra.engine) "nodes" }}
{{- fail "extraConfig.engine.nodes: set multinode.enabled and multinode.nodes instead (they also render the LeaderWorkerSet whose pods are those nodes)" }}
{{- end }}
{{- include "qwen-serve.validateScaleOut" . }}
{{- include "qwen-serve.validateLimits" . }}
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
