{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "testrunner-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the prefix of every resource name. The release name alone when it already
contains the chart name, else "<release>-<chart>".
*/}}
{{- define "testrunner-operator.fullname" -}}
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

{{/*
"name-version" for the helm.sh/chart label.
*/}}
{{- define "testrunner-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels every resource carries.
*/}}
{{- define "testrunner-operator.labels" -}}
helm.sh/chart: {{ include "testrunner-operator.chart" . }}
{{ include "testrunner-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/part-of: testrunner-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the operator pods. They never change across upgrades (a Deployment's
selector is immutable).
*/}}
{{- define "testrunner-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "testrunner-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "testrunner-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "testrunner-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image reference: repository@digest when a digest is set, else
repository:tag with the tag defaulting to the chart's appVersion. The operator is given
this same reference for the init container of wrapped-mode worker pods.
*/}}
{{- define "testrunner-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Name of the leader-election Lease.
*/}}
{{- define "testrunner-operator.leaseName" -}}
{{- default (include "testrunner-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
Name of the metrics Service; also the Prometheus job label a ServiceMonitor produces.
*/}}
{{- define "testrunner-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "testrunner-operator.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/*
The PolicyRules the operator needs on the namespaces it watches. Shared by the
ClusterRole (cluster-wide mode) and the per-namespace Roles (watchNamespaces mode).
No wildcards: every group, resource and verb is named.
*/}}
{{- define "testrunner-operator.operatorRules" -}}
- apiGroups: ["testrunner.dev"]
  resources: ["testrunnerpools"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["testrunner.dev"]
  resources: ["testrunnerpools/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["testrunner.dev"]
  resources: ["testrunnerpools/finalizers"]
  verbs: ["update"]
# Worker pods: created, labelled and deleted by the operator.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Events about pools (Normal and Warning), through the events.k8s.io API.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Each pool's quarantine list (<pool>-quarantine), mounted into its worker pods.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
# Each revision of a pool's workload (<pool>-<revision>, owned by the pool): listed by
# label, created, marked stable or rolled back, and pruned beyond ten.
- apiGroups: ["apps"]
  resources: ["controllerrevisions"]
  verbs: ["list", "create", "patch", "delete"]
# The broker URI of each pool (spec.queue.connectionSecretRef): read by name, never listed.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}

{{/*
Fails the render on combinations of values that the schema cannot refuse.
*/}}
{{- define "testrunner-operator.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail (printf "replicaCount is %d but leaderElection.enabled is false: two operators would reconcile the same pools. Enable leader election or set replicaCount to 1." (int .Values.replicaCount)) }}
{{- end }}
{{- if and .Values.watchNamespaces (not (eq (len .Values.watchNamespaces) (len (uniq .Values.watchNamespaces)))) }}
{{- fail "watchNamespaces lists a namespace twice" }}
{{- end }}
{{- end }}
