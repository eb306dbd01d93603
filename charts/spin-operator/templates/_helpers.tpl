{{/* Names, labels and the operator's RBAC rules, shared by the templates. */}}

{{- define "spin-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spin-operator.fullname" -}}
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

{{- define "spin-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spin-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spin-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "spin-operator.labels" -}}
helm.sh/chart: {{ include "spin-operator.chart" . }}
{{ include "spin-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: spin
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "spin-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spin-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository:tag", the tag defaulting to the chart's appVersion. */}}
{{- define "spin-operator.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "spin-operator.peeringName" -}}
{{- default (include "spin-operator.fullname" .) .Values.ha.peeringName }}
{{- end }}

{{/* Cluster-wide mode: no watchNamespaces. */}}
{{- define "spin-operator.clusterwide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
Checks of value combinations that a JSON schema cannot express well; `fail` names the values.
*/}}
{{- define "spin-operator.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.ha.enabled) }}
{{- fail (printf "replicas is %d but ha.enabled is false: without kopf peering every operator pod would act on every SpinRun. Set ha.enabled=true (and keep replicas >= 2) or replicas=1" (int .Values.replicas)) }}
{{- end }}
{{- if ne (len .Values.watchNamespaces) (len (uniq .Values.watchNamespaces)) }}
{{- fail (printf "watchNamespaces lists a namespace twice: %v" .Values.watchNamespaces) }}
{{- end }}
{{- end }}

{{/*
RBAC rules for the namespaced resources the operator uses, in every namespace it serves. Exactly the verbs of the
requests the operator makes (tests/test_chart.py checks them against the request log of the operator tests):
  - spinruns: kopf lists and watches them (the operator keeps no state on the object itself: no annotations,
    no finalizers; children are deleted by the garbage collector through their ownerReferences);
  - spinruns/status: the operator and kopf patch the status subresource;
  - spinruns/finalizers (update): required by the API server's OwnerReferencesPermissionEnforcement admission
    plugin to set blockOwnerDeletion in the children's ownerReferences (kopf.adopt does); no request uses it;
  - jobs (generation, Indexed) and pytorchjobs (training): created, watched, read and patched to adopt an
    existing child of the same name, patched (suspend), deleted on retry;
  - configmaps: the resolved SpinRun spec mounted into the children (created, read, patched);
  - pods: get and list only, for the termination messages of the children;
  - events: kopf and the operator post Events on the SpinRun.
No Secret access: the pods name spec.storage.credentialsSecret, the kubelet reads it.
*/}}
{{- define "spin-operator.namespacedRules" -}}
- apiGroups: ["selfplay.dev"]
  resources: ["spinruns"]
  verbs: ["list", "watch"]
- apiGroups: ["selfplay.dev"]
  resources: ["spinruns/status"]
  verbs: ["patch"]
- apiGroups: ["selfplay.dev"]
  resources: ["spinruns/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "patch"]
{{- end }}

{{/* kopf's own cluster-wide observation: CRDs always; namespaces only when serving a list of namespaces. */}}
{{- define "spin-operator.observerRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if not (include "spin-operator.clusterwide" .) }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}

{{/* kopf peering (HA only): watch the peering object and patch this pod's record into it. */}}
{{- define "spin-operator.peeringRules" -}}
- apiGroups: ["kopf.dev"]
  resources: [{{ if include "spin-operator.clusterwide" . }}"clusterkopfpeerings"{{ else }}"kopfpeerings"{{ end }}]
  verbs: ["list", "watch", "patch"]
{{- end }}
