{{/* Name of the chart, overridable. */}}
{{- define "gpufleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name: the release name, suffixed with the chart name unless it contains it. */}}
{{- define "gpufleet.fullname" -}}
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

{{- define "gpufleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "gpufleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "operator") */}}
{{- define "gpufleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpufleet.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
gpufleet.io/component: {{ .component }}
{{- end -}}

{{/* An image reference: (dict "ctx" $ "image" .Values.operator.image) */}}
{{- define "gpufleet.image" -}}
{{- $registry := (.ctx.Values.global | default dict).imageRegistry | default .ctx.Values.image.registry -}}
{{- $tag := .image.tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" $registry .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "gpufleet.operatorName" -}}{{ include "gpufleet.fullname" . }}-operator{{- end -}}
{{- define "gpufleet.routerName" -}}{{ include "gpufleet.fullname" . }}-router{{- end -}}
{{- define "gpufleet.podServerRole" -}}{{ include "gpufleet.fullname" . }}-pod-server{{- end -}}

{{/* Namespaces whose ModelGroups the router serves: router.namespaces, else the operator's, else the release's. */}}
{{- define "gpufleet.routerNamespaces" -}}
{{- $ns := .Values.router.namespaces | default .Values.operator.watchNamespaces | default (list .Release.Namespace) -}}
{{- join "," $ns -}}
{{- end -}}

{{/* imagePullSecrets: the chart's plus global.imagePullSecrets (names or {name: ...}). */}}
{{- define "gpufleet.imagePullSecrets" -}}
{{- $out := list -}}
{{- range concat (.Values.imagePullSecrets | default list) ((.Values.global | default dict).imagePullSecrets | default list) -}}
{{- if kindIs "string" . }}{{ $out = append $out (dict "name" .) }}{{ else }}{{ $out = append $out . }}{{ end -}}
{{- end -}}
{{- with $out }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* Pod and container security contexts that pass the "restricted" Pod Security Standard. */}}
{{- define "gpufleet.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podSecurity.runAsUser }}
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "gpufleet.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}
