{{/* Names, labels, images and the store Secrets every template shares. */}}

{{- define "kubesaga.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name, at most 42 characters so "<prefix>-notification-metrics" still fits in 63. */}}
{{- define "kubesaga.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 42 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<component>": call with (list $ "order"). */}}
{{- define "kubesaga.componentName" -}}
{{- printf "%s-%s" (include "kubesaga.fullname" (index . 0)) (index . 1) }}
{{- end }}

{{- define "kubesaga.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource: call with (list $ "component"). */}}
{{- define "kubesaga.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "kubesaga.chart" $root }}
{{ include "kubesaga.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Values.image.tag | default $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: kubesaga
{{- end }}

{{/* Selector labels: call with (list $ "component"). */}}
{{- define "kubesaga.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "kubesaga.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Image of a kubesaga component: call with (list $ "order"). */}}
{{- define "kubesaga.image" -}}
{{- $root := index . 0 }}
{{- $image := $root.Values.image }}
{{- printf "%s/%s%s:%s" $image.registry $image.repository (index . 1) ($image.tag | default $root.Chart.AppVersion) }}
{{- end }}

{{/* Image of a third-party component: call with its image values ({repository, tag}). */}}
{{- define "kubesaga.externalImage" -}}
{{- printf "%s:%s" .repository .tag }}
{{- end }}

{{/* Pod-level settings every kubesaga pod shares: pull secrets and the security context. */}}
{{- define "kubesaga.podSecurity" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{ end -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* Environment every kubesaga container gets. */}}
{{- define "kubesaga.commonEnv" -}}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- with .Values.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* The Secret the chart writes for its own Redis and Postgres. */}}
{{- define "kubesaga.storesSecretName" -}}
{{- include "kubesaga.componentName" (list . "stores") }}
{{- end }}

{{/* {"name": ..., "key": ...} of the Secret with the Redis URL, as JSON. */}}
{{- define "kubesaga.redisSecretRef" -}}
{{- if .Values.redis.enabled }}
{{- dict "name" (include "kubesaga.storesSecretName" .) "key" "redis-url" | toJson }}
{{- else }}
{{- $name := required "externalRedis.existingSecret is required when redis.enabled is false: name a Secret holding the Redis URL" .Values.externalRedis.existingSecret }}
{{- dict "name" $name "key" .Values.externalRedis.existingSecretKey | toJson }}
{{- end }}
{{- end }}

{{/* {"name": ..., "key": ...} of the Secret with a service's Postgres URL, as JSON: call with (list $ "order"). */}}
{{- define "kubesaga.databaseSecretRef" -}}
{{- $root := index . 0 }}
{{- $service := index . 1 }}
{{- if $root.Values.postgresql.enabled }}
{{- dict "name" (include "kubesaga.storesSecretName" $root) "key" (printf "%s-database-url" $service) | toJson }}
{{- else }}
{{- $name := required "externalPostgresql.existingSecret is required when postgresql.enabled is false: name a Secret holding one Postgres URL per service" $root.Values.externalPostgresql.existingSecret }}
{{- dict "name" $name "key" (index $root.Values.externalPostgresql.keys $service) | toJson }}
{{- end }}
{{- end }}

{{/* Environment with a service's store URLs: call with (list $ "order"). */}}
{{- define "kubesaga.storeEnv" -}}
{{- $root := index . 0 }}
{{- $service := index . 1 }}
{{- $db := include "kubesaga.databaseSecretRef" . | fromJson -}}
- name: {{ upper $service }}_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $db.name }}
      key: {{ $db.key }}
{{- end }}

{{- define "kubesaga.redisEnv" -}}
{{- $redis := include "kubesaga.redisSecretRef" . | fromJson -}}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $redis.name }}
      key: {{ $redis.key }}
{{- end }}

{{/* "initContainer" or "hook": how migrations run, after resolving "auto". */}}
{{- define "kubesaga.migrationMode" -}}
{{- $mode := .Values.migrations.mode }}
{{- if eq $mode "auto" }}
{{- ternary "initContainer" "hook" .Values.postgresql.enabled }}
{{- else if and (eq $mode "hook") .Values.postgresql.enabled }}
{{- fail "migrations.mode=hook needs an external Postgres (postgresql.enabled=false): the in-chart Postgres does not exist yet when pre-install hooks run; use \"auto\" or \"initContainer\"" }}
{{- else }}
{{- $mode }}
{{- end }}
{{- end }}

{{/* Base URL of a service as the operator reaches it: call with (list $ "order"). */}}
{{- define "kubesaga.serviceURL" -}}
{{- $root := index . 0 }}
{{- $service := index . 1 }}
{{- printf "http://%s.%s.svc.%s:%v" (include "kubesaga.componentName" .) $root.Release.Namespace $root.Values.clusterDomain (index $root.Values $service).service.port }}
{{- end }}

{{/* The services with an outbox, which get an OutboxRelay. */}}
{{- define "kubesaga.outboxServices" -}}
order inventory payment
{{- end }}
