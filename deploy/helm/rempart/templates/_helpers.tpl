{{/*
Names, labels and the environment contract shared by every template.
Component templates receive a context dict: root (the chart's $), name (component key) and
c (the component's values with .Values.defaults merged under them: see rempart.component).
*/}}

{{- define "rempart.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rempart.fullname" -}}
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

{{- define "rempart.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of one part of the release: rempart.partName (list $ "policy") -> <fullname>-policy */}}
{{- define "rempart.partName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "rempart.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one part: rempart.selectorLabels (list $ "policy") */}}
{{- define "rempart.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "rempart.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Labels of every object: rempart.labels (list $ "policy"); the part may be "" */}}
{{- define "rempart.labels" -}}
{{- $root := index . 0 }}
{{- $part := index . 1 -}}
helm.sh/chart: {{ include "rempart.chart" $root }}
app.kubernetes.io/name: {{ include "rempart.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
{{- if $part }}
app.kubernetes.io/component: {{ $part }}
{{- end }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: rempart
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
{{- end }}

{{/* Selector of every pod of the release (the deny-all policy) */}}
{{- define "rempart.releaseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "rempart.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rempart.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rempart.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The component's values with .Values.defaults under them, as YAML: rempart.component (list $ name) */}}
{{- define "rempart.component" -}}
{{- $root := index . 0 }}
{{- $component := index $root.Values.components (index . 1) }}
{{- toYaml (mergeOverwrite (deepCopy $root.Values.defaults) (deepCopy $component)) }}
{{- end }}

{{- define "rempart.image" -}}
{{- $root := .root }}
{{- $image := $root.Values.image }}
{{- $tag := default $root.Chart.AppVersion $image.tag }}
{{- if $image.registry }}
{{- printf "%s/%s/%s:%s" $image.registry $image.repository .c.imageName $tag }}
{{- else }}
{{- printf "%s/%s:%s" $image.repository .c.imageName $tag }}
{{- end }}
{{- end }}

{{/* Image of a bundled dependency: rempart.depImage .Values.redis.image */}}
{{- define "rempart.depImage" -}}
{{- if .registry }}
{{- printf "%s/%s:%s" .registry .repository .tag }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{- define "rempart.secretKeySecretName" -}}
{{- default (include "rempart.partName" (list . "secret-key")) .Values.secretKey.existingSecret }}
{{- end }}

{{- define "rempart.credentialsSecretName" -}}
{{- include "rempart.partName" (list . "credentials") }}
{{- end }}

{{- define "rempart.tlsSecretName" -}}
{{- default (include "rempart.partName" (list . "tls")) .Values.tls.secretName }}
{{- end }}

{{/* Does the chart itself need the credentials Secret? "true" or "" */}}
{{- define "rempart.needsCredentials" -}}
{{- $adminApi := index .Values.components "admin-api" }}
{{- $bootstrap := and $adminApi.enabled .Values.admin.bootstrap.enabled (not .Values.admin.bootstrap.existingSecret) }}
{{- if or (and .Values.redis.enabled .Values.redis.auth.enabled) (and .Values.nats.enabled .Values.nats.auth.enabled) $bootstrap }}true{{ end }}
{{- end }}

{{- define "rempart.adminEmail" -}}
{{- default (printf "admin@%s" .Values.global.mailHostname) .Values.admin.bootstrap.email }}
{{- end }}

{{- define "rempart.svcDomain" -}}
{{- printf "%s.svc.%s" .Release.Namespace .Values.global.clusterDomain }}
{{- end }}

{{/* dns:/// target of a gRPC component: rempart.grpcTarget (list $ "policy") */}}
{{- define "rempart.grpcTarget" -}}
{{- $root := index . 0 }}
{{- $peer := index . 1 }}
{{- $peerValues := index $root.Values.components $peer }}
{{- $port := (first $peerValues.ports).containerPort }}
{{- printf "dns:///%s-headless.%s:%v" (include "rempart.partName" (list $root $peer)) (include "rempart.svcDomain" $root) $port }}
{{- end }}

{{/* TCP port of a URL, or the given default: rempart.urlPort (list "redis://h:6380/0" 6379) */}}
{{- define "rempart.urlPort" -}}
{{- $hostport := (urlParse (index . 0)).host }}
{{- $port := regexFind ":[0-9]+$" $hostport | trimPrefix ":" }}
{{- default (index . 1) $port }}
{{- end }}

{{/*
The environment of a component, as a YAML list. Every variable the code reads is REMPART_*;
REDIS_PASSWORD and NATS_PASSWORD exist only to be expanded into the URLs ($(VAR) references
are expanded by the kubelet). extraEnv replaces a variable of the same name, or is appended.
*/}}
{{- define "rempart.env" -}}
{{- $root := .root }}
{{- $c := .c }}
{{- $values := $root.Values }}
{{- $credentials := include "rempart.credentialsSecretName" $root }}
{{- $env := list }}
{{- $env = append $env (dict "name" "REMPART_ENVIRONMENT" "value" "prod") }}
{{- $env = append $env (dict "name" "REMPART_HOSTNAME" "value" $values.global.mailHostname) }}
{{- $env = append $env (dict "name" "REMPART_LOG_FORMAT" "value" "json") }}
{{- $env = append $env (dict "name" "REMPART_LOG_LEVEL" "value" (default $values.global.logLevel $c.logLevel)) }}
{{- $env = append $env (dict "name" "REMPART_OPS_PORT" "value" (toString $c.opsPort)) }}
{{- range $c.ports }}
{{- $env = append $env (dict "name" .env "value" (toString .containerPort)) }}
{{- end }}
{{- /* Redis */}}
{{- $redisHost := printf "%s.%s" (include "rempart.partName" (list $root "redis")) (include "rempart.svcDomain" $root) }}
{{- if $values.redis.enabled }}
{{- if $values.redis.auth.enabled }}
{{- $env = append $env (dict "name" "REDIS_PASSWORD" "valueFrom" (dict "secretKeyRef" (dict "name" $credentials "key" "redis-password"))) }}
{{- $env = append $env (dict "name" "REMPART_REDIS_URL" "value" (printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" $redisHost)) }}
{{- else }}
{{- $env = append $env (dict "name" "REMPART_REDIS_URL" "value" (printf "redis://%s:6379/0" $redisHost)) }}
{{- end }}
{{- else if $values.redis.externalUrlSecret.name }}
{{- $env = append $env (dict "name" "REMPART_REDIS_URL" "valueFrom" (dict "secretKeyRef" (dict "name" $values.redis.externalUrlSecret.name "key" $values.redis.externalUrlSecret.key))) }}
{{- else }}
{{- $env = append $env (dict "name" "REMPART_REDIS_URL" "value" (required "redis.externalUrl or redis.externalUrlSecret.name is required when redis.enabled is false" $values.redis.externalUrl)) }}
{{- end }}
{{- /* NATS */}}
{{- $natsHost := printf "%s.%s" (include "rempart.partName" (list $root "nats")) (include "rempart.svcDomain" $root) }}
{{- if $values.nats.enabled }}
{{- if $values.nats.auth.enabled }}
{{- $env = append $env (dict "name" "NATS_PASSWORD" "valueFrom" (dict "secretKeyRef" (dict "name" $credentials "key" "nats-password"))) }}
{{- $env = append $env (dict "name" "REMPART_NATS_URL" "value" (printf "nats://%s:$(NATS_PASSWORD)@%s:4222" $values.nats.auth.user $natsHost)) }}
{{- else }}
{{- $env = append $env (dict "name" "REMPART_NATS_URL" "value" (printf "nats://%s:4222" $natsHost)) }}
{{- end }}
{{- else if $values.nats.externalUrlSecret.name }}
{{- $env = append $env (dict "name" "REMPART_NATS_URL" "valueFrom" (dict "secretKeyRef" (dict "name" $values.nats.externalUrlSecret.name "key" $values.nats.externalUrlSecret.key))) }}
{{- else }}
{{- $env = append $env (dict "name" "REMPART_NATS_URL" "value" (required "nats.externalUrl or nats.externalUrlSecret.name is required when nats.enabled is false" $values.nats.externalUrl)) }}
{{- end }}
{{- $env = append $env (dict "name" "REMPART_STREAM_REPLICAS" "value" (toString $values.nats.streamReplicas)) }}
{{- $env = append $env (dict "name" "REMPART_SECRET_KEY" "valueFrom" (dict "secretKeyRef" (dict "name" (include "rempart.secretKeySecretName" $root) "key" $values.secretKey.existingSecretKey))) }}
{{- range $c.grpcPeers }}
{{- $env = append $env (dict "name" (printf "REMPART_%s_TARGET" (. | upper | replace "-" "_")) "value" (include "rempart.grpcTarget" (list $root .))) }}
{{- end }}
{{- if $c.tls }}
{{- $env = append $env (dict "name" "REMPART_TLS_CERT_FILE" "value" "/etc/rempart/tls/tls.crt") }}
{{- $env = append $env (dict "name" "REMPART_TLS_KEY_FILE" "value" "/etc/rempart/tls/tls.key") }}
{{- end }}
{{- if $c.proxyProtocol }}
{{- $env = append $env (dict "name" "REMPART_PROXY_PROTOCOL_CIDRS" "value" (join "," $values.proxyProtocol.trustedCidrs)) }}
{{- end }}
{{- if and $c.dnsResolver $values.dns.nameservers }}
{{- $env = append $env (dict "name" "REMPART_DNS_NAMESERVERS" "value" (join "," $values.dns.nameservers)) }}
{{- end }}
{{- if eq .name "admin-api" }}
{{- $bootstrap := $values.admin.bootstrap }}
{{- if $bootstrap.existingSecret }}
{{- $env = append $env (dict "name" "REMPART_BOOTSTRAP_ADMIN_EMAIL" "valueFrom" (dict "secretKeyRef" (dict "name" $bootstrap.existingSecret "key" $bootstrap.emailKey))) }}
{{- $env = append $env (dict "name" "REMPART_BOOTSTRAP_ADMIN_PASSWORD" "valueFrom" (dict "secretKeyRef" (dict "name" $bootstrap.existingSecret "key" $bootstrap.passwordKey))) }}
{{- else if $bootstrap.enabled }}
{{- $env = append $env (dict "name" "REMPART_BOOTSTRAP_ADMIN_EMAIL" "valueFrom" (dict "secretKeyRef" (dict "name" $credentials "key" "admin-email"))) }}
{{- $env = append $env (dict "name" "REMPART_BOOTSTRAP_ADMIN_PASSWORD" "valueFrom" (dict "secretKeyRef" (dict "name" $credentials "key" "admin-password"))) }}
{{- end }}
{{- end }}
{{- if $values.opentelemetry.endpoint }}
{{- $env = append $env (dict "name" "OTEL_EXPORTER_OTLP_ENDPOINT" "value" $values.opentelemetry.endpoint) }}
{{- $env = append $env (dict "name" "OTEL_SERVICE_NAME" "value" .name) }}
{{- if $values.opentelemetry.protocol }}
{{- $env = append $env (dict "name" "OTEL_EXPORTER_OTLP_PROTOCOL" "value" $values.opentelemetry.protocol) }}
{{- end }}
{{- end }}
{{- /* extraEnv: same name replaces, new names are appended */}}
{{- $merged := list }}
{{- $extra := $c.extraEnv | default list }}
{{- range $env }}
{{- $current := . }}
{{- $replacement := dict }}
{{- range $extra }}
{{- if eq .name $current.name }}{{ $replacement = . }}{{ end }}
{{- end }}
{{- $merged = append $merged (ternary $replacement $current (not (empty $replacement))) }}
{{- end }}
{{- range $extra }}
{{- $name := .name }}
{{- $known := false }}
{{- range $env }}{{ if eq .name $name }}{{ $known = true }}{{ end }}{{ end }}
{{- if not $known }}{{ $merged = append $merged . }}{{ end }}
{{- end }}
{{- toYaml $merged }}
{{- end }}

{{/* Pod selector (NetworkPolicyPeer podSelector) of one component: rempart.podPeer (list $ name) */}}
{{- define "rempart.podPeer" -}}
podSelector:
  matchLabels:
    {{- include "rempart.selectorLabels" . | nindent 4 }}
{{- end }}

{{/* Names of the enabled components, as a JSON list */}}
{{- define "rempart.enabledComponents" -}}
{{- $names := list }}
{{- range $name, $component := .Values.components }}
{{- if $component.enabled }}{{ $names = append $names $name }}{{ end }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* Peer matching every enabled component's pods (Redis and NATS clients) */}}
{{- define "rempart.componentsPeer" -}}
podSelector:
  matchLabels:
    {{- include "rempart.releaseSelectorLabels" . | nindent 4 }}
  matchExpressions:
    - key: app.kubernetes.io/component
      operator: In
      values:
        {{- include "rempart.enabledComponents" . | fromJsonArray | toYaml | nindent 8 }}
{{- end }}
