{{/* Name of the chart's objects: the release name, with "portless" when it lacks it. */}}
{{- define "portless.fullname" -}}
{{- if contains "portless" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-portless" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "portless.selectorLabels" -}}
app.kubernetes.io/name: portless
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "portless.labels" -}}
{{ include "portless.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "portless.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/*
One TOML value. Helm reads every YAML number as a float, and portless
refuses 53.0 where it wants a port, so whole numbers are written as
integers; strings and lists of strings as JSON strings, which are TOML
basic strings.
*/}}
{{- define "portless.tomlValue" -}}
{{- if kindIs "float64" . -}}
{{- if eq (floor .) . }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else if or (kindIs "int" .) (kindIs "int64" .) (kindIs "bool" .) -}}
{{ . }}
{{- else if kindIs "slice" . -}}
[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "portless.tomlValue" $v }}{{ end }}]
{{- else -}}
{{ toString . | toJson }}
{{- end -}}
{{- end -}}

{{/* The TOML file: the general keys of .Values.config, then its tables. */}}
{{- define "portless.toml" -}}
{{- $config := .Values.config -}}
{{- range $k, $v := $config }}
{{- if not (kindIs "map" $v) }}
{{ $k }} = {{ include "portless.tomlValue" $v }}
{{- end }}
{{- end }}
{{- range $table := list "dns" "router" "acme" "cluster" }}
{{- with (get $config $table) }}

[{{ $table }}]
{{- range $k, $v := . }}
{{ $k }} = {{ include "portless.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The admin API's listen address, as portless parses it. */}}
{{- define "portless.adminListen" -}}
{{- $a := .Values.admin.address -}}
{{- if eq $a "hostIP" -}}
$(HOST_IP):{{ .Values.admin.port }}
{{- else if contains ":" $a -}}
[{{ $a }}]:{{ .Values.admin.port }}
{{- else -}}
{{ $a }}:{{ .Values.admin.port }}
{{- end -}}
{{- end -}}

{{/* The port of an ADDR:PORT string. */}}
{{- define "portless.port" -}}
{{- regexFind "[0-9]+$" . -}}
{{- end -}}
