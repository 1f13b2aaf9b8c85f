{{- define "kubetune.name" -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetune.labels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "kubetune.name" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference from {repository, tag}; the tag defaults to the chart's appVersion. */}}
{{- define "kubetune.imageRef" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{- define "kubetune.operatorImage" -}}
{{- include "kubetune.imageRef" (dict "image" .Values.operator.image "root" .) -}}
{{- end -}}

{{- define "kubetune.workerImage" -}}
{{- include "kubetune.imageRef" (dict "image" .Values.worker.image "root" .) -}}
{{- end -}}

{{/* Each empty field of server.image is the worker's. */}}
{{- define "kubetune.serverImage" -}}
{{- $image := dict "repository" (default .Values.worker.image.repository .Values.server.image.repository) "tag" (default .Values.worker.image.tag .Values.server.image.tag) -}}
{{- include "kubetune.imageRef" (dict "image" $image "root" .) -}}
{{- end -}}

{{/*
The ServiceAccount the operator names in worker (or server) pods, or "" for the namespace's default:
the chart's own account exists only in the listed namespaces.
Call with (dict "account" .Values.worker.serviceAccount "suffix" "worker" "root" .).
*/}}
{{- define "kubetune.podServiceAccount" -}}
{{- if and .account.create .root.Values.operator.watchNamespaces -}}
{{- default (printf "%s-%s" (include "kubetune.name" .root) .suffix) .account.name -}}
{{- else if not .account.create -}}
{{- .account.name -}}
{{- end -}}
{{- end -}}

{{/* Checks of combinations the schema cannot express with a useful message. */}}
{{- define "kubetune.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.operator.peering) -}}
{{- fail "replicaCount > 1 needs operator.peering: standalone replicas would all handle the same objects" -}}
{{- end -}}
{{- if and .Values.rbac.namespaced (not .Values.operator.watchNamespaces) -}}
{{- fail "rbac.namespaced needs operator.watchNamespaces: the namespaces to grant the operator access in" -}}
{{- end -}}
{{- end -}}

{{/*
What the operator does inside a watched namespace, verb by verb (checked against the API calls in
kubetune/operator/ and kopf's needs). Bound cluster-wide, or per namespace with rbac.namespaced.
*/}}
{{- define "kubetune.namespacedRules" -}}
# kopf lists and watches the kubetune objects and patches their annotations (handler progress);
# the reconcilers read them (an AdapterDeployment reads the FineTuneJobs it serves).
- apiGroups: [kubetune.dev]
  resources: [finetunejobs, adapterdeployments]
  verbs: [get, list, watch, patch]
- apiGroups: [kubetune.dev]
  resources: [finetunejobs/status, adapterdeployments/status]
  verbs: [patch]
# Children carry ownerReferences with blockOwnerDeletion, which clusters enforcing
# OwnerReferencesPermissionEnforcement allow only to whoever may update the owner's finalizers.
- apiGroups: [kubetune.dev]
  resources: [finetunejobs/finalizers, adapterdeployments/finalizers]
  verbs: [update]
# Children, written with server-side apply (patch; creating one through apply needs create too)
# after reading the current one: a FineTuneJob's worker Job (kopf also watches it) and plan
# ConfigMap; an AdapterDeployment's Deployment, serving-plan ConfigMap and Service.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, create, patch]
# A FineTuneJob's work claim (checkpoints) when its output is not on a claim.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, create, patch]
# An AdapterDeployment's admin-token Secret (created once, read each pass for the token the
# operator sends to its pods) and, with more than one replica, its PodDisruptionBudget (deleted
# when scaled back to one).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch, delete]
# Worker and serving pods: kopf watches them, the reconcilers list them (ready pods are then called
# over HTTP, which needs no RBAC).
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# Condition transitions (and kopf's warnings and errors) are posted as core/v1 Events.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Kueue's Workloads of queued worker Jobs: kopf watches them and a pass lists a waiting Job's
# Workload, whose conditions say why Kueue has not admitted it (harmless without Kueue).
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list, watch]
{{- if and .Values.operator.peering .Values.operator.watchNamespaces }}
# kopf peering of an operator limited to namespaces: a KopfPeering in each.
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end -}}

{{/* What kopf observes cluster-wide, whatever the operator's scope. */}}
{{- define "kubetune.clusterRules" -}}
# kopf notices CustomResourceDefinitions appearing and disappearing.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if .Values.operator.watchNamespaces }}
# kopf limited to namespaces follows them being created and deleted.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- else if .Values.operator.peering }}
# kopf peering of a cluster-wide operator: a ClusterKopfPeering.
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end -}}
