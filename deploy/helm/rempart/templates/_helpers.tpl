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
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
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

{{/* The admin API's own ServiceAccount (rbac.clusterView): the only one with a token mounted. */}}
{{- define "rempart.adminServiceAccountName" -}}
{{- printf "%s-admin-api" (include "rempart.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* ServiceAccount and token mount of a component's pods: rempart.podIdentity (list $ name) */}}
{{- define "rempart.podIdentity" -}}
{{- $root := index . 0 }}
{{- if and (eq (index . 1) "admin-api") $root.Values.rbac.clusterView }}
serviceAccountName: {{ include "rempart.adminServiceAccountName" $root }}
# GET /v1/cluster lists this namespace's pods (Role rempart-cluster-view: get, list).
automountServiceAccountToken: true
{{- else }}
serviceAccountName: {{ include "rempart.serviceAccountName" $root }}
automountServiceAccountToken: false
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
{{- $name := printf "%s/%s" $image.repository .c.imageName }}
{{- if $image.registry }}{{ $name = printf "%s/%s" $image.registry $name }}{{ end }}
{{- $digest := index ($image.digests | default dict) .c.imageName | default "" }}
{{- if $digest }}
{{- printf "%s:%s@%s" $name $tag $digest }}
{{- else }}
{{- printf "%s:%s" $name $tag }}
{{- end }}
{{- end }}

{{/* Image of a bundled dependency: rempart.depImage .Values.redis.image; a digest pins it */}}
{{- define "rempart.depImage" -}}
{{- $name := ternary (printf "%s/%s" .registry .repository) .repository (not (empty .registry)) }}
{{- if .digest }}
{{- printf "%s:%s@%s" $name .tag .digest }}
{{- else }}
{{- printf "%s:%s" $name .tag }}
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
{{- if $values.redis.enabled }}
{{- $auth := "" }}
{{- if $values.redis.auth.enabled }}
{{- $env = append $env (dict "name" "REDIS_PASSWORD" "valueFrom" (dict "secretKeyRef" (include "rempart.redisPasswordRef" $root | fromYaml))) }}
{{- $auth = ":$(REDIS_PASSWORD)@" }}
{{- end }}
{{- if include "rempart.redisSentinel" $root }}
{{- $sentinels := list }}
{{- range $i := until (int $values.redis.replicas) }}
{{- $sentinels = append $sentinels (printf "%s:26379" (include "rempart.redisPodHost" (list $root $i))) }}
{{- end }}
{{- $query := ternary "?sentinel_password=$(REDIS_PASSWORD)" "" (not (empty $auth)) }}
{{- $env = append $env (dict "name" "REMPART_REDIS_URL" "value" (printf "redis+sentinel://%s%s/%s/0%s" $auth (join "," $sentinels) $values.redis.sentinel.masterSet $query)) }}
{{- /* The catch-up indexer acks a mail record once a replica has its index writes (Redis WAIT) */}}
{{- $env = append $env (dict "name" "REMPART_REDIS_WAIT_REPLICAS" "value" "1") }}
{{- else }}
{{- $redisHost := printf "%s.%s" (include "rempart.partName" (list $root "redis")) (include "rempart.svcDomain" $root) }}
{{- $env = append $env (dict "name" "REMPART_REDIS_URL" "value" (printf "redis://%s%s:6379/0" $auth $redisHost)) }}
{{- end }}
{{- else if $values.redis.externalUrlSecret.name }}
{{- $env = append $env (dict "name" "REMPART_REDIS_URL" "valueFrom" (dict "secretKeyRef" (dict "name" $values.redis.externalUrlSecret.name "key" $values.redis.externalUrlSecret.key))) }}
{{- else }}
{{- $env = append $env (dict "name" "REMPART_REDIS_URL" "value" (required "redis.externalUrl or redis.externalUrlSecret.name is required when redis.enabled is false" $values.redis.externalUrl)) }}
{{- end }}
{{- /* NATS: in a cluster every pod is named, so a client starts even while one is down */}}
{{- if $values.nats.enabled }}
{{- $auth := "" }}
{{- if $values.nats.auth.enabled }}
{{- $env = append $env (dict "name" "NATS_PASSWORD" "valueFrom" (dict "secretKeyRef" (include "rempart.natsPasswordRef" $root | fromYaml))) }}
{{- $auth = printf "%s:$(NATS_PASSWORD)@" $values.nats.auth.user }}
{{- end }}
{{- $urls := list }}
{{- if gt (int $values.nats.replicas) 1 }}
{{- range $i := until (int $values.nats.replicas) }}
{{- $urls = append $urls (printf "nats://%s%s:4222" $auth (include "rempart.natsPodHost" (list $root $i))) }}
{{- end }}
{{- else }}
{{- $urls = append $urls (printf "nats://%s%s.%s:4222" $auth (include "rempart.partName" (list $root "nats")) (include "rempart.svcDomain" $root)) }}
{{- end }}
{{- $env = append $env (dict "name" "REMPART_NATS_URL" "value" (join "," $urls)) }}
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
{{- if $values.tls.sni }}
{{- $env = append $env (dict "name" "REMPART_TLS_SNI_DIR" "value" "/etc/rempart/tls-sni") }}
{{- end }}
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

{{/* DNS name of one NATS pod: rempart.natsPodHost (list $ 0) */}}
{{- define "rempart.natsPodHost" -}}
{{- $root := index . 0 }}
{{- printf "%s-%d.%s.%s" (include "rempart.partName" (list $root "nats")) (index . 1) (include "rempart.partName" (list $root "nats-headless")) (include "rempart.svcDomain" $root) }}
{{- end }}

{{/* DNS name of one Redis pod: rempart.redisPodHost (list $ 0) */}}
{{- define "rempart.redisPodHost" -}}
{{- $root := index . 0 }}
{{- printf "%s-%d.%s.%s" (include "rempart.partName" (list $root "redis")) (index . 1) (include "rempart.partName" (list $root "redis-headless")) (include "rempart.svcDomain" $root) }}
{{- end }}

{{- define "rempart.redisSentinel" -}}
{{- if and .Values.redis.enabled (eq .Values.redis.architecture "sentinel") }}true{{ end }}
{{- end }}

{{/*
Topology spread of one part (a component, Redis, NATS): the given constraints, each without a
labelSelector getting the part's own (without one a constraint counts no pod at all); or, when
none are given, a soft spread over zones and a soft spread over nodes.
rempart.spread (list $ "nats" .Values.nats.topologySpreadConstraints)
*/}}
{{- define "rempart.spread" -}}
{{- $selector := dict "matchLabels" (include "rempart.selectorLabels" (list (index . 0) (index . 1)) | fromYaml) }}
{{- $constraints := index . 2 }}
{{- if not $constraints }}
{{- $constraints = list (dict "maxSkew" 1 "topologyKey" "topology.kubernetes.io/zone" "whenUnsatisfiable" "ScheduleAnyway") (dict "maxSkew" 1 "topologyKey" "kubernetes.io/hostname" "whenUnsatisfiable" "ScheduleAnyway") }}
{{- end }}
{{- $out := list }}
{{- range $constraints }}
{{- $out = append $out (ternary . (merge (dict "labelSelector" $selector) .) (hasKey . "labelSelector")) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
Secrets the chart makes itself (DESIGN.md: secrets from the environment), decided once per render
and shared by the Secrets and the checksum annotations: a value already in the cluster's Secret
is kept (lookup, `helm install/upgrade`); a missing one is generated (secrets.generate: true) or
refused with the value to set (false: GitOps, where `helm template` cannot read the cluster
and would make new ones at every render). Returns JSON: key -> plain value.
*/}}
{{- define "rempart.generatedSecrets" -}}
{{- if not (hasKey .Values "_rempartGenerated") }}
{{- $values := .Values }}
{{- $out := dict }}
{{- $generate := $values.secrets.generate }}
{{- $why := "secrets.generate is false (GitOps mode): the chart makes no secret; set" }}
{{- if not $values.secretKey.existingSecret }}
{{- if not $generate }}{{ fail (printf "%s secretKey.existingSecret" $why) }}{{ end }}
{{- $live := lookup "v1" "Secret" .Release.Namespace (include "rempart.secretKeySecretName" .) }}
{{- $previous := dig "data" $values.secretKey.existingSecretKey "" $live | b64dec }}
{{- /* 32 random bytes, URL-safe base64 (a valid Fernet key) */}}
{{- $_ := set $out "secret-key" ($previous | default (randBytes 32 | replace "+" "-" | replace "/" "_")) }}
{{- end }}
{{- $live := lookup "v1" "Secret" .Release.Namespace (include "rempart.credentialsSecretName" .) }}
{{- if and $values.redis.enabled $values.redis.auth.enabled (not $values.redis.auth.existingSecret) }}
{{- if not $generate }}{{ fail (printf "%s redis.auth.existingSecret" $why) }}{{ end }}
{{- $_ := set $out "redis-password" (dig "data" "redis-password" "" $live | b64dec | default (randAlphaNum 32)) }}
{{- end }}
{{- if and $values.nats.enabled $values.nats.auth.enabled (not $values.nats.auth.existingSecret) }}
{{- if not $generate }}{{ fail (printf "%s nats.auth.existingSecret" $why) }}{{ end }}
{{- $_ := set $out "nats-password" (dig "data" "nats-password" "" $live | b64dec | default (randAlphaNum 32)) }}
{{- end }}
{{- $adminApi := index $values.components "admin-api" }}
{{- if and $adminApi.enabled $values.admin.bootstrap.enabled (not $values.admin.bootstrap.existingSecret) }}
{{- if not $generate }}{{ fail (printf "%s admin.bootstrap.existingSecret (or admin.bootstrap.enabled: false)" $why) }}{{ end }}
{{- $_ := set $out "admin-email" (include "rempart.adminEmail" .) }}
{{- /* Lower, upper, digits and a symbol, for any password policy */}}
{{- $password := printf "%s%s-%s%s" (randAlpha 8 | lower) (randAlpha 8 | upper) (randNumeric 4) (randAlphaNum 8) }}
{{- $_ := set $out "admin-password" (dig "data" "admin-password" "" $live | b64dec | default $password) }}
{{- end }}
{{- $_ := set $values "_rempartGenerated" $out }}
{{- end }}
{{- toJson (index .Values "_rempartGenerated") }}
{{- end }}

{{/*
Checksum annotation value of a secret a pod reads from its environment (a change must roll the
pods): the generated value, or the name of the operator's Secret (its content is not ours to
read; roll those pods yourself, or with a tool such as Reloader, when you change it).
rempart.secretChecksum (list $ existingSecretName generatedKey)
*/}}
{{- define "rempart.secretChecksum" -}}
{{- $root := index . 0 }}
{{- $existing := index . 1 }}
{{- if $existing }}
{{- printf "existing:%s" $existing | sha256sum | trunc 16 }}
{{- else }}
{{- $generated := include "rempart.generatedSecrets" $root | fromJson }}
{{- index $generated (index . 2) | default "" | sha256sum | trunc 16 }}
{{- end }}
{{- end }}

{{/* secretKeyRef (name, key) of the Redis password */}}
{{- define "rempart.redisPasswordRef" -}}
{{- if .Values.redis.auth.existingSecret -}}
name: {{ .Values.redis.auth.existingSecret }}
key: {{ .Values.redis.auth.existingSecretKey }}
{{- else -}}
name: {{ include "rempart.credentialsSecretName" . }}
key: redis-password
{{- end }}
{{- end }}

{{/* secretKeyRef (name, key) of the NATS password */}}
{{- define "rempart.natsPasswordRef" -}}
{{- if .Values.nats.auth.existingSecret -}}
name: {{ .Values.nats.auth.existingSecret }}
key: {{ .Values.nats.auth.existingSecretKey }}
{{- else -}}
name: {{ include "rempart.credentialsSecretName" . }}
key: nats-password
{{- end }}
{{- end }}

{{/* What the Redis pods' scripts need to find each other (sentinel mode) */}}
{{- define "rempart.redisSentinelEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: STATEFULSET
  value: {{ include "rempart.partName" (list . "redis") | quote }}
- name: HEADLESS
  value: {{ printf "%s.%s" (include "rempart.partName" (list . "redis-headless")) (include "rempart.svcDomain" .) | quote }}
- name: REPLICAS
  value: {{ .Values.redis.replicas | quote }}
- name: MASTER_SET
  value: {{ .Values.redis.sentinel.masterSet | quote }}
{{- end }}

{{/*
Ports the components reach Redis or NATS on when they are external (NetworkPolicy egress), as a
JSON list: the operator's list, else every port in the URL (a Sentinel URL: its Sentinels' and
6379, the primary's), else the default. rempart.externalPorts (list $values.redis.externalPorts
$values.redis.externalUrl "6379")
*/}}
{{- define "rempart.externalPorts" -}}
{{- $given := index . 0 }}
{{- $url := index . 1 }}
{{- $default := index . 2 }}
{{- $ports := list }}
{{- if $given }}
{{- range $given }}{{ $ports = append $ports (int .) }}{{ end }}
{{- else }}
{{- $authority := regexReplaceAll "^[a-z+]+://([^/?]*).*$" $url "${1}" | splitList "@" | last }}
{{- range splitList "," $authority }}
{{- $port := regexFind ":[0-9]+$" . | trimPrefix ":" }}
{{- if $port }}{{ $ports = append $ports (int $port) }}{{ end }}
{{- end }}
{{- if hasPrefix "redis+sentinel" $url | or (hasPrefix "rediss+sentinel" $url) }}
{{- $ports = append $ports 6379 }}
{{- end }}
{{- if not $ports }}{{ $ports = list (int $default) }}{{ end }}
{{- end }}
{{- toJson ($ports | uniq) }}
{{- end }}

{{/* Peers allowed on the ops ports and NATS monitoring, as a JSON list: Prometheus, opsFrom */}}
{{- define "rempart.opsPeers" -}}
{{- $peers := list }}
{{- $prometheus := .Values.networkPolicy.prometheus }}
{{- if $prometheus.enabled }}
{{- $peer := dict }}
{{- with $prometheus.namespaceSelector }}{{ $_ := set $peer "namespaceSelector" . }}{{ end }}
{{- with $prometheus.podSelector }}{{ $_ := set $peer "podSelector" . }}{{ end }}
{{- if not $peer }}{{ fail "networkPolicy.prometheus needs a namespaceSelector or a podSelector (or enabled: false)" }}{{ end }}
{{- $peers = append $peers $peer }}
{{- end }}
{{- range .Values.networkPolicy.opsFrom }}{{ $peers = append $peers . }}{{ end }}
{{- toJson $peers }}
{{- end }}
