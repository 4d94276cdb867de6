"""Label and annotation keys shared by the operator, the pod server and the router."""

from __future__ import annotations

DOMAIN = "gpufleet.io"
API_GROUP = DOMAIN
API_VERSION = "v1alpha1"
KIND = "ModelGroup"
PLURAL = "modelgroups"
SINGULAR = "modelgroup"
SHORT_NAMES = ("mg",)

# Labels (selectable).
LABEL_COMPONENT = f"{DOMAIN}/component"  # "pod-server" | "router" | "operator"
LABEL_MODEL_GROUP = f"{DOMAIN}/model-group"
LABEL_POOL = f"{DOMAIN}/pool"  # on a GpuPool's pods (which carry no model-group label)
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
COMPONENT_POD_SERVER = "pod-server"
COMPONENT_ROUTER = "router"
COMPONENT_OPERATOR = "operator"
MANAGED_BY = "gpufleet-operator"

# Annotations (data).
STATUS_ANNOTATION = f"{DOMAIN}/status"  # JSON PodStatus written by the pod server
SPEC_HASH_ANNOTATION = f"{DOMAIN}/spec-hash"  # lets the operator see hand edits of its children
CONFIG_HASH_ANNOTATION = f"{DOMAIN}/config-hash"  # on pod templates: a new model_groups.json rolls the pods
# Prefix of the annotations where the operator framework (kopf) keeps its own bookkeeping.
OPERATOR_STATE_PREFIX = f"operator.{DOMAIN}"

# Node labels users' GPU tooling already sets.
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

# Exclusive leases the router takes (coordination.k8s.io Leases in the router's namespace). Their own
# managed-by value keeps them apart from the pod servers' status Leases (component=pod-server).
ROUTER_LEASE_MANAGED_BY = "gpufleet-router"
LABEL_LEASE_TARGET = f"{DOMAIN}/lease-target"  # label: the target, sanitised; annotation: exactly
LEASE_DEVICES_ANNOTATION = f"{DOMAIN}/lease-devices"  # JSON list of the "pod/device" keys held
LEASE_UUIDS_ANNOTATION = f"{DOMAIN}/lease-gpu-uuids"  # JSON list of the held GPUs' UUIDs, where known
