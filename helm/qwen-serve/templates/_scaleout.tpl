{{/*
Scale-out helpers: the InferencePool and its endpoint picker (inferencePool.*), and the multi-node
LeaderWorkerSet (multinode.*). docs/scale-out.md describes both.
*/}}

{{/*
Name of the InferencePool (inferencePool.name, else the full name).
Usage: {{ include "qwen-serve.poolName" . }}
*/}}
{{- define "qwen-serve.poolName" -}}
{{- default (include "qwen-serve.fullname" .) .Values.inferencePool.name }}
{{- end }}

{{/*
The label that makes a pod a member of the InferencePool. Only serving pods carry it: the Deployment's pods,
or a LeaderWorkerSet's leaders (its workers run Ray only and answer no requests).
Usage: {{ include "qwen-serve.poolLabel" . }}
*/}}
{{- define "qwen-serve.poolLabel" -}}
qwen-serve.io/inference-pool: {{ include "qwen-serve.poolName" . }}
{{- end }}

{{/*
The InferencePool's selector: the release's selector labels plus the pool label.
Usage: {{ include "qwen-serve.poolSelectorLabels" . }}
*/}}
{{- define "qwen-serve.poolSelectorLabels" -}}
{{ include "qwen-serve.selectorLabels" . }}
{{ include "qwen-serve.poolLabel" . }}
{{- end }}

{{/*
Selector of the traffic and metrics Services: the selector labels and, with multinode, only the group
leaders (LeaderWorkerSet worker index 0), which run the gateway.
Usage: {{ include "qwen-serve.serviceSelector" . }}
*/}}
{{- define "qwen-serve.serviceSelector" -}}
{{ include "qwen-serve.selectorLabels" . }}
{{- if .Values.multinode.enabled }}
leaderworkerset.sigs.k8s.io/worker-index: "0"
{{- end }}
{{- end }}

{{/*
Name of the endpoint picker's objects (Deployment, Service, ServiceAccount, Role, ConfigMap).
Usage: {{ include "qwen-serve.pickerName" . }}
*/}}
{{- define "qwen-serve.pickerName" -}}
{{- printf "%s-epp" (include "qwen-serve.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}

{{/*
The Service the InferencePool's endpointPickerRef names: the rendered picker's, or
inferencePool.picker.serviceName for a picker installed separately.
Usage: {{ include "qwen-serve.pickerServiceName" . }}
*/}}
{{- define "qwen-serve.pickerServiceName" -}}
{{- if .Values.inferencePool.picker.enabled }}
{{- include "qwen-serve.pickerName" . }}
{{- else }}
{{- .Values.inferencePool.picker.serviceName }}
{{- end }}
{{- end }}

{{/*
Selector labels of the picker's pods. The name differs from the chart's, so the qwen-serve Services, PDB
and NetworkPolicy never select the picker.
Usage: {{ include "qwen-serve.pickerSelectorLabels" . }}
*/}}
{{- define "qwen-serve.pickerSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-endpoint-picker" (include "qwen-serve.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of the picker's objects.
Usage: {{ include "qwen-serve.pickerLabels" . }}
*/}}
{{- define "qwen-serve.pickerLabels" -}}
helm.sh/chart: {{ include "qwen-serve.chart" . }}
{{- with .Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
{{ include "qwen-serve.pickerSelectorLabels" . }}
app.kubernetes.io/component: endpoint-picker
app.kubernetes.io/part-of: qwen-serve
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Port the picker scrapes on every pool pod: inferencePool.picker.metricsPort, else gateway.metricsPort.
Usage: {{ include "qwen-serve.pickerMetricsPort" . }}
*/}}
{{- define "qwen-serve.pickerMetricsPort" -}}
{{- int (default .Values.gateway.metricsPort .Values.inferencePool.picker.metricsPort) }}
{{- end }}

{{/*
A Gateway API duration ("1h30m", "500ms"; the values schema checks the form) in milliseconds.
*/}}
{{- define "qwen-serve.durationMs" -}}
{{- $ms := 0 }}
{{- range regexFindAll "[0-9]+(h|ms|m|s)" . -1 }}
{{- $n := regexFind "^[0-9]+" . }}
{{- $unit := trimPrefix $n . }}
{{- $ms = add $ms (mul (atoi $n) (get (dict "h" 3600000 "m" 60000 "s" 1000 "ms" 1) $unit)) }}
{{- end }}
{{- $ms }}
{{- end }}

{{/*
Render-time checks of the scale-out values (called from qwen-serve.validate).
*/}}
{{- define "qwen-serve.validateScaleOut" -}}
{{- $v := .Values }}
{{- $pool := $v.inferencePool }}
{{- if and $pool.httpRoute.enabled (not $pool.enabled) }}
{{- fail "inferencePool.httpRoute.enabled: the HTTPRoute's backend is the InferencePool; set inferencePool.enabled too" }}
{{- end }}
{{- if and $pool.enabled $pool.httpRoute.enabled (not $pool.httpRoute.parentRefs) }}
{{- fail "inferencePool.httpRoute.parentRefs: name the Gateway the route attaches to (e.g. [{name: inference-gateway}])" }}
{{- end }}
{{- with $pool.httpRoute.timeouts }}
{{- if and .request .backendRequest }}
{{- $request := include "qwen-serve.durationMs" .request | int64 }}
{{- if and (gt $request 0) (gt (include "qwen-serve.durationMs" .backendRequest | int64) $request) }}
{{- fail (printf "inferencePool.httpRoute.timeouts.backendRequest: %s is longer than timeouts.request %s; the HTTPRoute API refuses it" .backendRequest .request) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and $pool.enabled (not $pool.picker.enabled) (not $pool.picker.serviceName) }}
{{- fail "inferencePool.picker.serviceName: with inferencePool.picker.enabled false, name the Service of the endpoint picker installed beside this release" }}
{{- end }}
{{- if $v.multinode.enabled }}
{{- $dp := $v.engine.dataParallelSize }}
{{- if and (not (kindIs "string" $dp)) (gt (int $dp) 1) }}
{{- fail (printf "engine.dataParallelSize=%d with multinode.enabled: a multi-node engine is one replica (pipeline parallel across multinode.nodes); add replicas with replicaCount" (int $dp)) }}
{{- end }}
{{- $modes := include "qwen-serve.cacheAccessModes" . | fromJsonArray }}
{{- if and $modes (not (has "ReadWriteMany" $modes)) }}
{{- fail (printf "multinode.enabled with a model cache of access modes %s: the %d pods of a group run on %d nodes and cannot all mount it; use modelCache.accessMode=ReadWriteMany (or an existingClaim that is), or modelCache.enabled=false (each pod downloads into its own emptyDir)" (join "," $modes) (int $v.multinode.nodes) (int $v.multinode.nodes)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The engine container's resources with the GPU count set (as the Deployment computes them), as YAML.
Usage: {{ include "qwen-serve.scaleout.resources" (dict "ctx" . "gpus" true) }}
*/}}
{{- define "qwen-serve.scaleout.resources" -}}
{{- $values := .ctx.Values }}
{{- $gpuResource := $values.engine.gpuResourceName }}
{{- $resources := deepCopy (default dict $values.resources) }}
{{- $limits := default dict $resources.limits }}
{{- $_ := set $limits $gpuResource (int $values.engine.gpus) }}
{{- $_ := set $resources "limits" $limits }}
{{- if $resources.requests }}
{{- $_ := set $resources.requests $gpuResource (int $values.engine.gpus) }}
{{- end }}
{{- if not .gpus }}
{{- range $kind := list "limits" "requests" }}
{{- with get $resources $kind }}{{ $_ := unset . $gpuResource }}{{ end }}
{{- end }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
Environment of every pod of a multi-node group (leader and workers): the engine's environment as in the
Deployment (a worker's Ray processes load their pipeline stage from the same cache, offline), plus what
Ray, vLLM and NCCL need to find each other.
Usage: {{ include "qwen-serve.scaleout.env" . | nindent 12 }}
*/}}
{{- define "qwen-serve.scaleout.env" -}}
- name: HF_HOME
  value: {{ printf "%s/huggingface" (include "qwen-serve.modelDir" .) | quote }}
- name: HF_HUB_DISABLE_TELEMETRY
  value: "1"
- name: VLLM_NO_USAGE_STATS
  value: "1"
- name: DO_NOT_TRACK
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
- name: VLLM_CACHE_ROOT
  value: {{ printf "%s/cache/vllm" (include "qwen-serve.modelDir" .) | quote }}
- name: TRITON_CACHE_DIR
  value: {{ printf "%s/cache/triton" (include "qwen-serve.modelDir" .) | quote }}
- name: TORCHINDUCTOR_CACHE_DIR
  value: {{ printf "%s/cache/torchinductor" (include "qwen-serve.modelDir" .) | quote }}
{{- if or (include "qwen-serve.predownload" .) (include "qwen-serve.localModel" .) }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
# The address vLLM and Ray use for this pod (Ray's node IP must be it).
- name: VLLM_HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: NCCL_SOCKET_IFNAME
  value: {{ .Values.multinode.socketInterface | quote }}
- name: GLOO_SOCKET_IFNAME
  value: {{ .Values.multinode.socketInterface | quote }}
{{- with include "qwen-serve.hfTokenEnv" . }}
{{ . }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod-level fields shared by the leader and worker templates (as in the Deployment).
Usage: {{ include "qwen-serve.scaleout.podHead" . | nindent 10 }}
*/}}
{{- define "qwen-serve.scaleout.podHead" -}}
serviceAccountName: {{ include "qwen-serve.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The model download init container (the Deployment's), for every pod of a group: each pod loads its own
pipeline stage from the cache. The leader, which runs the gateway, first gets the limits-config init
container with limits.existingSecret (the workers never read the Redis URL).
Usage: {{ include "qwen-serve.scaleout.initContainers" (dict "ctx" . "leader" true) | nindent 10 }}
*/}}
{{- define "qwen-serve.scaleout.initContainers" -}}
{{- $limits := and .leader (include "qwen-serve.limitsFromSecret" .ctx) }}
{{- with .ctx }}
{{- if or $limits (include "qwen-serve.predownload" .) -}}
initContainers:
{{- end }}
{{- if $limits }}
  {{- include "qwen-serve.limitsConfigInit" . | nindent 2 }}
{{- end }}
{{- if include "qwen-serve.predownload" . }}
  - name: model-download
    image: {{ include "qwen-serve.image" . | quote }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command:
      - python3
      - -c
      - |
        import sys
        from huggingface_hub import snapshot_download
        from qwen_serve.config import load_config
        from qwen_serve.presets import resolve_geometry
        model = load_config(sys.argv[1]).model
        repo = resolve_geometry(model.source).hf_id or model.source
        print(f"downloading {repo} at revision {model.revision or 'default'}", flush=True)
        try:
            path = snapshot_download(repo, revision=model.revision)
        except Exception as exc:
            try:
                path = snapshot_download(repo, revision=model.revision, local_files_only=True)
            except Exception:
                raise exc from None
            print(f"download failed ({exc}); using the snapshot already in the cache", flush=True)
        print(f"model ready in {path}", flush=True)
    args: [{{ include "qwen-serve.configPath" . | quote }}]
    env:
      - name: HF_HOME
        value: {{ printf "%s/huggingface" (include "qwen-serve.modelDir" .) | quote }}
      - name: HF_HUB_DISABLE_TELEMETRY
        value: "1"
      - name: PYTHONUNBUFFERED
        value: "1"
      {{- with include "qwen-serve.hfTokenEnv" . }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- with .Values.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    resources:
      {{- include "qwen-serve.scaleout.resources" (dict "ctx" . "gpus" false) | nindent 6 }}
    {{- with .Values.securityContext }}
    securityContext:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      - name: config
        mountPath: {{ include "qwen-serve.configPath" . }}
        subPath: config.yaml
        readOnly: true
      - name: model-cache
        mountPath: {{ include "qwen-serve.modelDir" . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Volumes and scheduling shared by the leader and worker templates (as in the Deployment); the leader's also
hold the completed config with limits.existingSecret.
Usage: {{ include "qwen-serve.scaleout.podTail" (dict "ctx" . "leader" true) | nindent 10 }}
*/}}
{{- define "qwen-serve.scaleout.podTail" -}}
{{- $limits := and .leader (include "qwen-serve.limitsFromSecret" .ctx) }}
{{- with .ctx -}}
volumes:
  - name: config
    configMap:
      name: {{ include "qwen-serve.fullname" . }}
  {{- if $limits }}
  {{- include "qwen-serve.limitsConfigVolume" . | nindent 2 }}
  {{- end }}
  {{- if .Values.auth.enabled }}
  - name: keys
    secret:
      secretName: {{ include "qwen-serve.keysSecretName" . }}
  {{- end }}
  - name: model-cache
    {{- if .Values.modelCache.enabled }}
    persistentVolumeClaim:
      claimName: {{ include "qwen-serve.modelCacheClaim" . }}
    {{- else }}
    {{- with .Values.modelCache.emptyDirSizeLimit }}
    emptyDir:
      sizeLimit: {{ . }}
    {{- else }}
    emptyDir: {}
    {{- end }}
    {{- end }}
  # NCCL inside a node and vLLM's workers exchange data through shared memory; the runtime gives 64 MiB.
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ .Values.shm.sizeLimit }}
  {{- with .Values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}
