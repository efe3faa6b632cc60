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

{{/* The one image: the agent, the engine and the operator, chosen by command. */}}
{{- define "podwire.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* "true" when podwire-engine runs as its own DaemonSet and the agent in engine mode external:
the userspace datapath only (see values.yaml, engine). */}}
{{- define "podwire.externalEngine" -}}
{{- if and (eq .Values.agent.datapath "userspace") .Values.engine.enabled -}}true{{- end -}}
{{- end -}}

{{/* "true" when the ServiceMonitors are rendered: asked for, and the cluster has their API. */}}
{{- define "podwire.serviceMonitor" -}}
{{- if and .Values.metrics.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}true{{- end -}}
{{- end -}}
