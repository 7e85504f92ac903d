{{- define "etcd-syncer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "etcd-syncer.fullname" -}}
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

{{- define "etcd-syncer.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{ include "etcd-syncer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "etcd-syncer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "etcd-syncer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* zk2etcd's pods: a name of their own, so the mirror's Deployment never selects them. */}}
{{- define "etcd-syncer.zk2etcdSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-zk2etcd" (include "etcd-syncer.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "etcd-syncer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "etcd-syncer.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "etcd-syncer.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* One side's section of config.toml; mounts match volumes.side below. */}}
{{- define "etcd-syncer.cluster" -}}
{{- $side := index . 0 -}}
{{- $values := index . 1 -}}
{{- range (include "etcd-syncer.allEndpoints" $values | fromJsonArray) }}
{{- if and (hasPrefix "https://" .) (not $values.tls.existingSecret) }}
{{- fail (printf "%s.tls.existingSecret is required for the https endpoint %s (a Secret with ca.crt, tls.crt and tls.key)" $side .) }}
{{- end }}
{{- end }}
{{- if not $values.endpointGroups }}
endpoints = [{{ range $i, $e := $values.endpoints }}{{ if $i }}, {{ end }}{{ $e | quote }}{{ end }}]
{{- end }}
{{- if $values.tls.existingSecret }}
cacert = "/etc/etcd-syncer/{{ $side }}-tls/ca.crt"
cert = "/etc/etcd-syncer/{{ $side }}-tls/tls.crt"
key = "/etc/etcd-syncer/{{ $side }}-tls/tls.key"
{{- end }}
{{- if $values.auth.username }}
user = {{ $values.auth.username | quote }}
password-file = "/etc/etcd-syncer/{{ $side }}-auth/password"
{{- end }}
{{- range $values.endpointGroups }}

[[{{ $side }}.endpoint-groups]]
name = {{ .name | quote }}
endpoints = [{{ range $i, $e := .endpoints }}{{ if $i }}, {{ end }}{{ $e | quote }}{{ end }}]
{{- end }}
{{- end -}}

{{/* One side's endpoints: its endpointGroups' if set, else endpoints (a JSON list). */}}
{{- define "etcd-syncer.allEndpoints" -}}
{{- $all := list -}}
{{- if .endpointGroups -}}
{{- range .endpointGroups -}}
{{- $all = concat $all .endpoints -}}
{{- end -}}
{{- else -}}
{{- $all = .endpoints -}}
{{- end -}}
{{- toJson $all -}}
{{- end -}}

{{/* Secret volumes and mounts for TLS and auth, shared by the Deployment and the repair Job. */}}
{{- define "etcd-syncer.secretVolumes" -}}
{{- range $side, $values := dict "source" .Values.source "destination" .Values.destination }}
{{- if $values.tls.existingSecret }}
- name: {{ $side }}-tls
  secret:
    secretName: {{ $values.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if $values.auth.existingSecret }}
- name: {{ $side }}-auth
  secret:
    secretName: {{ $values.auth.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- if and .Values.syncAuth.enabled .Values.syncAuth.passwordsSecret }}
- name: auth-passwords
  secret:
    secretName: {{ .Values.syncAuth.passwordsSecret }}
    defaultMode: 0440
    items:
      - key: passwords.toml
        path: passwords.toml
{{- end }}
{{- end -}}

{{- define "etcd-syncer.secretMounts" -}}
{{- range $side, $values := dict "source" .Values.source "destination" .Values.destination }}
{{- if $values.tls.existingSecret }}
- name: {{ $side }}-tls
  mountPath: /etc/etcd-syncer/{{ $side }}-tls
  readOnly: true
{{- end }}
{{- if $values.auth.existingSecret }}
- name: {{ $side }}-auth
  mountPath: /etc/etcd-syncer/{{ $side }}-auth
  readOnly: true
{{- end }}
{{- end }}
{{- if and .Values.syncAuth.enabled .Values.syncAuth.passwordsSecret }}
- name: auth-passwords
  mountPath: /etc/etcd-syncer/auth-passwords
  readOnly: true
{{- end }}
{{- end -}}

{{/* The etcd client ports the pods connect to: networkPolicy.egress.etcdPorts, else every endpoint's port. */}}
{{- define "etcd-syncer.etcdPorts" -}}
{{- $ports := list -}}
{{- if .Values.networkPolicy.egress.etcdPorts -}}
{{- $ports = .Values.networkPolicy.egress.etcdPorts -}}
{{- else -}}
{{- range concat (include "etcd-syncer.allEndpoints" .Values.source | fromJsonArray) (include "etcd-syncer.allEndpoints" .Values.destination | fromJsonArray) -}}
{{- $host := (urlParse .).host -}}
{{- if not (regexMatch ":[0-9]+$" $host) -}}
{{- fail (printf "endpoint %s has no port (etcd clients usually use 2379)" .) -}}
{{- end -}}
{{- $ports = append $ports (regexFind "[0-9]+$" $host | atoi) -}}
{{- end -}}
{{- end -}}
{{- toJson ($ports | uniq) -}}
{{- end -}}
