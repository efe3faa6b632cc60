{{/* The name every object of a release shares. */}}
{{- define "podwire.fullname" -}}
{{- if contains "podwire" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-podwire" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "podwire.labels" -}}
app.kubernetes.io/name: podwire
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "podwire.agentServiceAccount" -}}
{{- default (printf "%s-agent" (include "podwire.fullname" .)) .Values.serviceAccount.name -}}
{{- end -}}
