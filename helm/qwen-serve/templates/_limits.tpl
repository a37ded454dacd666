{{/*
Rate-limit backend helpers (limits.*, redis.*). docs/limits.md describes the backends; the chart either
writes `limits.redis_url` into the config (limits.redisUrl without a password, or the bundled Redis of
redis.enabled), or, with limits.existingSecret, has the init container `limits-config` add it at pod start
from the Secret (the config file a pod's gateway reads then lives in a memory-backed emptyDir; the
ConfigMap never holds the URL).
*/}}

{{/*
Name of the bundled Redis' objects (Deployment, Service, NetworkPolicy).
Usage: {{ include "qwen-serve.redisName" . }}
*/}}
{{- define "qwen-serve.redisName" -}}
{{- printf "%s-redis" (include "qwen-serve.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/*
Selector labels of the bundled Redis' pods. The name differs from the chart's, so the qwen-serve Services,
PDB and NetworkPolicy never select Redis.
Usage: {{ include "qwen-serve.redisSelectorLabels" . }}
*/}}
{{- define "qwen-serve.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-redis" (include "qwen-serve.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of the bundled Redis' objects.
Usage: {{ include "qwen-serve.redisLabels" . }}
*/}}
{{- define "qwen-serve.redisLabels" -}}
helm.sh/chart: {{ include "qwen-serve.chart" . }}
{{ include "qwen-serve.redisSelectorLabels" . }}
app.kubernetes.io/version: {{ regexReplaceAll "@.*$" (toString .Values.redis.image.tag) "" | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: rate-limit-store
app.kubernetes.io/part-of: qwen-serve
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The Redis URL the config gets, when it can be written into the ConfigMap: limits.redisUrl, else the
bundled Redis' Service (redis.enabled). Empty with limits.existingSecret (the URL comes from the Secret) or
when there is none.
Usage: {{ include "qwen-serve.redisUrl" . }}
*/}}
{{- define "qwen-serve.redisUrl" -}}
{{- if .Values.limits.redisUrl }}
{{- .Values.limits.redisUrl }}
{{- else if and .Values.redis.enabled (not .Values.limits.existingSecret) }}
{{- printf "redis://%s:6379/0" (include "qwen-serve.redisName" .) }}
{{- end }}
{{- end }}

{{/*
Whether the gateway's config is completed at pod start from limits.existingSecret: limits.backend redis
with the URL in a Secret. "true" or empty.
Usage: {{ if include "qwen-serve.limitsFromSecret" . }}
*/}}
{{- define "qwen-serve.limitsFromSecret" -}}
{{- if and (eq .Values.limits.backend "redis") .Values.limits.existingSecret }}true{{ end }}
{{- end }}

{{/*
The config's `limits` section as a dict (JSON), without the URL when it comes from a Secret. Empty dict for
limits.backend local, so the config of a local-backend release is what it was before these values existed
(no needless restart of the GPU pods on upgrade).
Usage: {{ include "qwen-serve.limitsSection" . | fromJson }}
*/}}
{{- define "qwen-serve.limitsSection" -}}
{{- $limits := dict }}
{{- if eq .Values.limits.backend "redis" }}
{{- $limits = dict "backend" "redis" "on_backend_error" .Values.limits.onBackendError }}
{{- with include "qwen-serve.redisUrl" . }}
{{- if not (include "qwen-serve.limitsFromSecret" $) }}{{ $_ := set $limits "redis_url" . }}{{ end }}
{{- end }}
{{- end }}
{{- toJson $limits }}
{{- end }}

{{/*
The pod template's checksum/config: the config and, when the URL comes from a Secret, the limits section and
the Secret reference the init container completes it with. Unchanged for any other release.
Usage: {{ include "qwen-serve.configChecksum" . }}
*/}}
{{- define "qwen-serve.configChecksum" -}}
{{- if include "qwen-serve.limitsFromSecret" . }}
{{- printf "%s\n%s\n%s/%s" (include "qwen-serve.config" .) (include "qwen-serve.limitsSection" .) .Values.limits.existingSecret .Values.limits.existingSecretKey | sha256sum }}
{{- else }}
{{- include "qwen-serve.config" . | sha256sum }}
{{- end }}
{{- end }}

{{/*
The init container that writes the gateway's config with limits.redis_url from limits.existingSecret:
the ConfigMap's config.yaml plus its limits.yaml plus the URL (env QWEN_SERVE_REDIS_URL, a secretKeyRef),
into the memory-backed emptyDir `config-rendered` (mode 0600), then loads it with qwen-serve's own config
loader so a bad URL stops the pod here, with the key path and never the URL in the log. The engine
container mounts that file at the usual config path; nothing else in the pod sees the URL.
Usage: {{ include "qwen-serve.limitsConfigInit" . | nindent 8 }} (a list item)
*/}}
{{- define "qwen-serve.limitsConfigInit" -}}
- name: limits-config
  image: {{ include "qwen-serve.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - python3
    - -c
    - |
      import os, sys
      import yaml
      from qwen_serve.config import load_config
      from qwen_serve.errors import ConfigError
      source, limits_file, target = sys.argv[1:4]
      with open(source, encoding="utf-8") as f:
          config = yaml.safe_load(f)
      with open(limits_file, encoding="utf-8") as f:
          limits = yaml.safe_load(f)
      url = os.environ.get("QWEN_SERVE_REDIS_URL", "").strip()
      if not url:
          sys.exit("limits.redis_url: the Secret's key is empty (limits.existingSecret / limits.existingSecretKey)")
      config["limits"] = {**limits, "redis_url": url}
      fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
      with os.fdopen(fd, "w", encoding="utf-8") as f:
          yaml.safe_dump(config, f, sort_keys=False)
      try:
          load_config(target)
      except ConfigError as exc:
          sys.exit(f"limits.existingSecret: {exc}")
      print(f"wrote {target}: limits.backend {limits['backend']}, redis_url from the Secret", flush=True)
  args:
    - {{ printf "%s/config.yaml" (include "qwen-serve.configSourceDir" .) | quote }}
    - {{ printf "%s/limits.yaml" (include "qwen-serve.configSourceDir" .) | quote }}
    - {{ printf "%s/config.yaml" (include "qwen-serve.configRenderedDir" .) | quote }}
  env:
    - name: QWEN_SERVE_REDIS_URL
      valueFrom:
        secretKeyRef:
          name: {{ .Values.limits.existingSecret }}
          key: {{ .Values.limits.existingSecretKey }}
    - name: PYTHONUNBUFFERED
      value: "1"
  resources:
    requests:
      cpu: 50m
      memory: 128Mi
    limits:
      memory: 256Mi
  {{- with .Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: config
      mountPath: {{ include "qwen-serve.configSourceDir" . }}
      readOnly: true
    - name: config-rendered
      mountPath: {{ include "qwen-serve.configRenderedDir" . }}
{{- end }}

{{/*
Where the limits-config init container reads the ConfigMap and writes the completed config.
*/}}
{{- define "qwen-serve.configSourceDir" -}}/etc/qwen-serve/source{{- end }}
{{- define "qwen-serve.configRenderedDir" -}}/etc/qwen-serve/rendered{{- end }}

{{/*
The volume holding the completed config (limits.existingSecret only), as a list item.
Usage: {{ include "qwen-serve.limitsConfigVolume" . | nindent 8 }}
*/}}
{{- define "qwen-serve.limitsConfigVolume" -}}
- name: config-rendered
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}

{{/*
Name of the volume the gateway's container mounts its config.yaml from (subPath config.yaml): the
ConfigMap's, or the completed copy with limits.existingSecret.
Usage: {{ include "qwen-serve.gatewayConfigVolume" . }}
*/}}
{{- define "qwen-serve.gatewayConfigVolume" -}}
{{- if include "qwen-serve.limitsFromSecret" . }}config-rendered{{ else }}config{{ end }}
{{- end }}

{{/*
Render-time checks of limits.* and redis.* (called from qwen-serve.validate).
*/}}
{{- define "qwen-serve.validateLimits" -}}
{{- $v := .Values }}
{{- $l := $v.limits }}
{{- if hasKey (default dict $v.extraConfig) "limits" }}
{{- fail "extraConfig.limits: set limits.backend, limits.redisUrl (or limits.existingSecret) and limits.onBackendError instead (a URL holding a password must come from a Secret, not the ConfigMap)" }}
{{- end }}
{{- if and $l.redisUrl (or (regexMatch "^[a-z]+://[^/@?#]*:[^/@?#]*@" $l.redisUrl) (regexMatch "[?&]password=" $l.redisUrl)) }}
{{- fail "limits.redisUrl holds a password and would be stored in a ConfigMap: put the URL in a Secret (kubectl create secret generic qwen-serve-redis --from-literal=redis-url='rediss://user:PASSWORD@host:6379/0') and set limits.existingSecret (and limits.existingSecretKey) instead" }}
{{- end }}
{{- if eq $l.backend "redis" }}
{{- $sources := list }}
{{- if $l.existingSecret }}{{ $sources = append $sources "limits.existingSecret" }}{{ end }}
{{- if $l.redisUrl }}{{ $sources = append $sources "limits.redisUrl" }}{{ end }}
{{- if $v.redis.enabled }}{{ $sources = append $sources "redis.enabled" }}{{ end }}
{{- if not $sources }}
{{- fail "limits.backend=redis needs a Redis: set limits.existingSecret (a Secret holding the URL under limits.existingSecretKey; required when the URL holds a password), limits.redisUrl (a redis://, rediss:// or unix:// URL without a password), or redis.enabled=true (the chart deploys a Redis and points the gateways at it)" }}
{{- end }}
{{- if gt (len $sources) 1 }}
{{- fail (printf "limits.backend=redis: %s each name the Redis to use; set only one" (join " and " $sources)) }}
{{- end }}
{{- end }}
{{- end }}
