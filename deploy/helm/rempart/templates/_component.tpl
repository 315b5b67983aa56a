{{/*
The objects of one component. Context: root, name, c (see _helpers.tpl).
*/}}

{{- define "rempart.deployment" -}}
{{- $root := .root }}
{{- $c := .c }}
{{- $part := list $root .name }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "rempart.partName" $part }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "rempart.labels" $part | nindent 4 }}
  {{- if and (eq .name "admin-api") $root.Values.rbac.clusterView }}
  annotations:
    checkov.io/skip1: "CKV_K8S_38=the admin API's GET /v1/cluster lists this namespace's pods with its token (Role: get and list on pods only); every other pod mounts none"
  {{- end }}
spec:
  {{- if not $c.autoscaling.enabled }}
  replicas: {{ $c.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "rempart.selectorLabels" $part | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "rempart.labels" $part | nindent 8 }}
        {{- with $c.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $annotations := $c.podAnnotations | default dict }}
      {{- /* Env read from Secrets is fixed at start: a changed password must roll the pods. */}}
      {{- $secretNames := list $root.Values.secretKey.existingSecret $root.Values.redis.auth.existingSecret $root.Values.nats.auth.existingSecret $root.Values.admin.bootstrap.existingSecret $root.Values.redis.externalUrlSecret.name $root.Values.nats.externalUrlSecret.name }}
      {{- $checksum := printf "%s|%s" (include "rempart.generatedSecrets" $root) (join "," $secretNames) | sha256sum | trunc 16 }}
      {{- $annotations = merge (dict "checksum/secrets" $checksum) $annotations }}
      {{- if $root.Values.metrics.scrapeAnnotations }}
      {{- $annotations = merge (dict "prometheus.io/scrape" "true" "prometheus.io/port" (toString $c.opsPort) "prometheus.io/path" "/metrics") $annotations }}
      {{- end }}
      {{- with $annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- include "rempart.podIdentity" (list $root .name) | nindent 6 }}
      enableServiceLinks: false
      {{- with $c.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $root.Values.image.pullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $c.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $c.terminationGracePeriodSeconds }}
      containers:
        - name: {{ .name }}
          image: {{ include "rempart.image" . | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command:
            - /opt/venv/bin/python
            - -m
            - {{ $c.module }}
          ports:
            {{- range $c.ports }}
            - name: {{ .name }}
              containerPort: {{ .containerPort }}
              protocol: TCP
            {{- end }}
            - name: ops
              containerPort: {{ $c.opsPort }}
              protocol: TCP
          env:
            {{- include "rempart.env" . | nindent 12 }}
          startupProbe:
            httpGet:
              path: /healthz
              port: ops
            {{- toYaml $c.probes.startup | nindent 12 }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: ops
            {{- toYaml $c.probes.liveness | nindent 12 }}
          readinessProbe:
            {{- if and $c.grpcProbe $c.ports }}
            grpc:
              port: {{ (first $c.ports).containerPort }}
            {{- else }}
            httpGet:
              path: /readyz
              port: ops
            {{- end }}
            {{- toYaml $c.probes.readiness | nindent 12 }}
          resources:
            {{- toYaml $c.resources | nindent 12 }}
          securityContext:
            {{- toYaml $c.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if $c.tls }}
            - name: tls
              mountPath: /etc/rempart/tls
              readOnly: true
            {{- if $root.Values.tls.sni }}
            - name: tls-sni
              mountPath: /etc/rempart/tls-sni
              readOnly: true
            {{- end }}
            {{- end }}
            {{- with $c.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: {{ $c.tmpSizeLimit }}
        {{- if $c.tls }}
        - name: tls
          secret:
            secretName: {{ $c.tlsSecretName | default (include "rempart.tlsSecretName" $root) }}
            defaultMode: 0440
        {{- with $root.Values.tls.sni }}
        # One <host name>/tls.crt + tls.key per SNI certificate (REMPART_TLS_SNI_DIR).
        - name: tls-sni
          projected:
            defaultMode: 0440
            sources:
              {{- range . }}
              - secret:
                  name: {{ .secretName }}
                  items:
                    - key: tls.crt
                      path: {{ .hostname }}/tls.crt
                    - key: tls.key
                      path: {{ .hostname }}/tls.key
              {{- end }}
        {{- end }}
        {{- end }}
        {{- with $c.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $c.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      topologySpreadConstraints:
        {{- include "rempart.spread" (list $root .name $c.topologySpreadConstraints) | nindent 8 }}
{{ end }}

{{- define "rempart.service" -}}
{{- $root := .root }}
{{- $c := .c }}
{{- $part := list $root .name }}
{{- $type := $c.service.type }}
{{- if and $c.ports (ne $type "None") }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ include "rempart.partName" $part }}{{ if eq $type "Headless" }}-headless{{ end }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "rempart.labels" $part | nindent 4 }}
  {{- with $c.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if eq $type "Headless" }}
  type: ClusterIP
  clusterIP: None
  {{- else }}
  type: {{ $type }}
  {{- end }}
  {{- if or (eq $type "LoadBalancer") (eq $type "NodePort") }}
  externalTrafficPolicy: {{ $c.service.externalTrafficPolicy | default "Cluster" }}
  {{- end }}
  {{- if eq $type "LoadBalancer" }}
  {{- with $c.service.loadBalancerClass }}
  loadBalancerClass: {{ . }}
  {{- end }}
  {{- with $c.service.loadBalancerSourceRanges }}
  loadBalancerSourceRanges:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with $c.service.ipFamilyPolicy }}
  ipFamilyPolicy: {{ . }}
  {{- end }}
  selector:
    {{- include "rempart.selectorLabels" $part | nindent 4 }}
  ports:
    {{- range $c.ports }}
    - name: {{ .name }}
      port: {{ .servicePort }}
      targetPort: {{ .name }}
      protocol: TCP
    {{- end }}
{{ end }}
{{- end }}

{{- define "rempart.pdb" -}}
{{- $c := .c }}
{{- $part := list .root .name }}
{{- if $c.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "rempart.partName" $part }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "rempart.labels" $part | nindent 4 }}
spec:
  {{- if hasKey $c.pdb "minAvailable" }}
  minAvailable: {{ $c.pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $c.pdb.maxUnavailable | default 1 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "rempart.selectorLabels" $part | nindent 6 }}
{{ end }}
{{- end }}

{{- define "rempart.hpa" -}}
{{- $c := .c }}
{{- $part := list .root .name }}
{{- if $c.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "rempart.partName" $part }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "rempart.labels" $part | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "rempart.partName" $part }}
  minReplicas: {{ $c.autoscaling.minReplicas }}
  maxReplicas: {{ $c.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $c.autoscaling.targetCPUUtilizationPercentage }}
    {{- with $c.autoscaling.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
  behavior:
    scaleDown:
      # Edge pods hold long sessions (IMAP IDLE): scale down slowly.
      stabilizationWindowSeconds: 300
{{ end }}
{{- end }}

{{- define "rempart.ingress" -}}
{{- $c := .c }}
{{- $part := list .root .name }}
{{- if and $c.ingress.enabled $c.ports }}
{{- $host := required (printf "components.%s.ingress.host is required when the ingress is enabled" .name) $c.ingress.host }}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: {{ include "rempart.partName" $part }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "rempart.labels" $part | nindent 4 }}
  {{- with $c.ingress.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $c.ingress.className }}
  ingressClassName: {{ . }}
  {{- end }}
  {{- with $c.ingress.tlsSecretName }}
  tls:
    - hosts:
        - {{ $host | quote }}
      secretName: {{ . }}
  {{- end }}
  rules:
    - host: {{ $host | quote }}
      http:
        paths:
          - path: {{ $c.ingress.path | default "/" }}
            pathType: Prefix
            backend:
              service:
                name: {{ include "rempart.partName" $part }}
                port:
                  name: {{ (first $c.ports).name }}
{{ end }}
{{- end }}

{{/*
Allow rules of one component; the deny-all policy (networkpolicy.yaml) closes everything else.
Ingress: the serving ports from ingressFrom plus, for a gRPC server, the pods of every enabled
component naming it in grpcPeers; the ops port from networkPolicy.opsFrom.
Egress: DNS, Redis, NATS, the gRPC peers, the OTLP endpoint, extraEgress.
*/}}
{{- define "rempart.networkPolicy" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- $c := .c }}
{{- $name := .name }}
{{- $part := list $root $name }}
{{- if $values.networkPolicy.enabled }}
{{- $opsPeers := include "rempart.opsPeers" $root | fromJsonArray }}
{{- $sources := list }}
{{- range $c.ingressFrom }}{{ $sources = append $sources . }}{{ end }}
{{- range $client, $clientValues := $values.components }}
{{- if and $clientValues.enabled (has $name $clientValues.grpcPeers) }}
{{- $sources = append $sources (include "rempart.podPeer" (list $root $client) | fromYaml) }}
{{- end }}
{{- end }}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "rempart.partName" $part }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "rempart.labels" $part | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "rempart.selectorLabels" $part | nindent 6 }}
  policyTypes:
    - Ingress
    - Egress
  {{- if not (or (and $c.ports $sources) $opsPeers) }}
  ingress: []
  {{- else }}
  ingress:
    {{- end }}
    {{- if and $c.ports $sources }}
    - from:
        {{- toYaml $sources | nindent 8 }}
      ports:
        {{- range $c.ports }}
        - port: {{ .containerPort }}
          protocol: TCP
        {{- end }}
    {{- end }}
    {{- with $opsPeers }}
    - from:
        {{- toYaml . | nindent 8 }}
      ports:
        - port: {{ $c.opsPort }}
          protocol: TCP
    {{- end }}
  egress:
    - ports:
        - port: 53
          protocol: UDP
        - port: 53
          protocol: TCP
      {{- with $values.networkPolicy.dnsTo }}
      to:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- if $values.redis.enabled }}
    - to:
        - {{ include "rempart.podPeer" (list $root "redis") | indent 10 | trim }}
      ports:
        - port: 6379
          protocol: TCP
        {{- if include "rempart.redisSentinel" $root }}
        - port: 26379
          protocol: TCP
        {{- end }}
    {{- else }}
    # External Redis: any destination on the URL's ports (redis.externalPorts).
    - ports:
        {{- range include "rempart.externalPorts" (list $values.redis.externalPorts $values.redis.externalUrl "6379") | fromJsonArray }}
        - port: {{ . }}
          protocol: TCP
        {{- end }}
    {{- end }}
    {{- if $values.nats.enabled }}
    - to:
        - {{ include "rempart.podPeer" (list $root "nats") | indent 10 | trim }}
      ports:
        - port: 4222
          protocol: TCP
    {{- else }}
    # External NATS: any destination on the URL's ports (nats.externalPorts).
    - ports:
        {{- range include "rempart.externalPorts" (list $values.nats.externalPorts $values.nats.externalUrl "4222") | fromJsonArray }}
        - port: {{ . }}
          protocol: TCP
        {{- end }}
    {{- end }}
    {{- range $c.grpcPeers }}
    {{- $peer := index $values.components . }}
    {{- if $peer.enabled }}
    - to:
        - {{ include "rempart.podPeer" (list $root .) | indent 10 | trim }}
      ports:
        - port: {{ (first $peer.ports).containerPort }}
          protocol: TCP
    {{- end }}
    {{- end }}
    {{- with $values.opentelemetry.endpoint }}
    {{- $scheme := (urlParse .).scheme }}
    - ports:
        - port: {{ include "rempart.urlPort" (list . (ternary "443" "4317" (eq $scheme "https"))) }}
          protocol: TCP
    {{- end }}
    {{- if and (eq .name "admin-api") $values.rbac.clusterView $values.rbac.apiServerTo }}
    # The Kubernetes API (GET /v1/cluster): rbac.apiServerTo, rbac.apiServerPorts.
    - to:
        {{- toYaml $values.rbac.apiServerTo | nindent 8 }}
      ports:
        {{- range $values.rbac.apiServerPorts }}
        - port: {{ . }}
          protocol: TCP
        {{- end }}
    {{- end }}
    {{- with (concat ($c.extraEgress | default list) ($values.networkPolicy.extraEgress | default list)) }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{ end }}
{{- end }}
