{{/* vim: set filetype=mustache: */}}

{{- define "shopctrl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "shopctrl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "shopctrl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "shopctrl.labels" -}}
helm.sh/chart: {{ include "shopctrl.chart" . }}
{{ include "shopctrl.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shopctrl-messaging
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "shopctrl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shopctrl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The four services. `key` is the values block, `name` the Kubernetes name suffix and the binary.
Call with: include "shopctrl.components" . | fromYaml
*/}}
{{- define "shopctrl.components" -}}
config:
  key: config
  name: config
  grpc: true
  public: false
  migrates: true
routing:
  key: routing
  name: routing
  grpc: true
  public: false
  migrates: true
ingress:
  key: ingress
  name: ingress
  grpc: false
  public: true
  migrates: false
flowCallback:
  key: flowCallback
  name: flow-callback
  grpc: false
  public: false
  migrates: false
{{- end -}}

{{/* Name of one service's objects. Call with (dict "root" $ "name" "config"). */}}
{{- define "shopctrl.componentFullname" -}}
{{- printf "%s-%s" (include "shopctrl.fullname" .root | trunc 48 | trimSuffix "-") .name -}}
{{- end -}}

{{- define "shopctrl.componentLabels" -}}
{{ include "shopctrl.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "shopctrl.componentSelectorLabels" -}}
{{ include "shopctrl.selectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "shopctrl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "shopctrl.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "shopctrl.secretName" -}}
{{- if .Values.secrets.create -}}
{{- printf "%s-secrets" (include "shopctrl.fullname" .) -}}
{{- else -}}
{{- default (printf "%s-secrets" (include "shopctrl.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "shopctrl.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "shopctrl.configGrpcUrl" -}}
{{- printf "http://%s:%v" (include "shopctrl.componentFullname" (dict "root" . "name" "config")) .Values.config.ports.grpc -}}
{{- end -}}

{{- define "shopctrl.publicBaseUrl" -}}
{{- if .Values.ingress.publicBaseUrl -}}
{{- .Values.ingress.publicBaseUrl -}}
{{- else if and .Values.publicIngress.enabled .Values.publicIngress.hosts -}}
{{- $host := (first .Values.publicIngress.hosts).host -}}
{{- $tls := false -}}
{{- range .Values.publicIngress.tls -}}
{{- if has $host .hosts -}}{{- $tls = true -}}{{- end -}}
{{- end -}}
{{- printf "%s://%s" (ternary "https" "http" $tls) $host -}}
{{- end -}}
{{- end -}}

{{/*
Non-secret environment of one service (a map, rendered into its ConfigMap): shared settings,
then what the chart derives, then the service's own `env` block, which wins.
Call with (dict "root" $ "c" $component).
*/}}
{{- define "shopctrl.componentEnv" -}}
{{- $root := .root -}}
{{- $c := .c -}}
{{- $v := index $root.Values $c.key -}}
{{- $env := dict
  "AMQP_PREFIX" $root.Values.amqpPrefix
  "ROUTING_SHARDS" (toString $root.Values.routingShards)
  "LOG_FORMAT" $root.Values.logFormat
  "RUST_LOG" $root.Values.rustLog
  "SHUTDOWN_GRACE_SECONDS" (toString $root.Values.shutdownGraceSeconds)
  "OPS_LISTEN_ADDR" (printf "%s:%v" $root.Values.listenHost $v.ports.ops)
  "OTEL_SERVICE_NAME" $c.name
  "OTEL_TRACES_SAMPLER" $root.Values.otel.sampler
  "OTEL_TRACES_SAMPLER_ARG" (toString $root.Values.otel.samplerArg)
-}}
{{- if $root.Values.otel.endpoint -}}
{{- $_ := set $env "OTEL_EXPORTER_OTLP_ENDPOINT" $root.Values.otel.endpoint -}}
{{- end -}}
{{- if $c.grpc -}}
{{- $_ := set $env "GRPC_LISTEN_ADDR" (printf "%s:%v" $root.Values.listenHost $v.ports.grpc) -}}
{{- end -}}
{{- if eq $c.name "ingress" -}}
{{- $_ := set $env "HTTP_LISTEN_ADDR" (printf "%s:%v" $root.Values.listenHost $v.ports.http) -}}
{{- $base := include "shopctrl.publicBaseUrl" $root -}}
{{- if $base -}}{{- $_ := set $env "PUBLIC_BASE_URL" $base -}}{{- end -}}
{{- end -}}
{{- if ne $c.name "config" -}}
{{- $_ := set $env "CONFIG_GRPC_URL" (include "shopctrl.configGrpcUrl" $root) -}}
{{- end -}}
{{- /* routing refuses to start with fewer than one connection per shard plus 8. */ -}}
{{- if and (eq $c.name "routing") (gt (add (int $root.Values.routingShards) 8) 16) -}}
{{- $_ := set $env "DATABASE_MAX_CONNECTIONS" (toString (add (int $root.Values.routingShards) 8)) -}}
{{- end -}}
{{- range $k, $val := $v.env -}}
{{- if eq $k "ROUTING_SHARDS" -}}
{{- fail (printf "%s.env.ROUTING_SHARDS: set the top-level routingShards instead; ingress and routing must agree" $c.key) -}}
{{- end -}}
{{- if hasKey $v.secretEnv $k -}}
{{- fail (printf "%s: %s is in both env and secretEnv" $c.key $k) -}}
{{- end -}}
{{- $_ := set $env $k (toString $val) -}}
{{- end -}}
{{- toYaml $env -}}
{{- end -}}

{{/* Seconds between SIGTERM-to-be and SIGKILL for one service. */}}
{{- define "shopctrl.terminationGrace" -}}
{{- $root := .root -}}
{{- $v := index $root.Values .c.key -}}
{{- $minimum := add (int $v.preStopSleepSeconds) (int $root.Values.shutdownGraceSeconds) -}}
{{- if kindIs "invalid" $v.terminationGracePeriodSeconds -}}
{{- add $minimum (int $root.Values.terminationGraceMarginSeconds) -}}
{{- else if le (int $v.terminationGracePeriodSeconds) $minimum -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds + shutdownGraceSeconds (%v)" .c.key $v.terminationGracePeriodSeconds $minimum) -}}
{{- else -}}
{{- int $v.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* Prefix of RabbitMQ names as a regular expression. */}}
{{- define "shopctrl.amqpPrefixRegex" -}}
{{- regexQuoteMeta .Values.amqpPrefix -}}
{{- end -}}
