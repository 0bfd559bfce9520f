{{/* Common labels. */}}
{{- define "relayfed.labels" -}}
app.kubernetes.io/name: relayfed
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The relayfed image. */}}
{{- define "relayfed.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The webhook's name (Service, Deployment, Secret). */}}
{{- define "relayfed.webhookName" -}}
{{ .Release.Name }}-injector
{{- end -}}
