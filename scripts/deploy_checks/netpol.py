"""What NetworkPolicies allow: Kubernetes' semantics (networking.k8s.io/v1) evaluated on a model of
pods, so that the checks can ask "can this pod reach that port?" without a cluster.

The rules, from the API reference: a pod is isolated for ingress (egress) once any policy in its
namespace selects it with Ingress (Egress) in policyTypes; an isolated pod accepts (sends) only
what some selecting policy's rule allows, the union of all of them. A rule with no `from`/`to`
allows every peer, with no `ports` every port. A peer is a podSelector (pods of the policy's own
namespace), a namespaceSelector (every pod of the matching namespaces), both (those pods of those
namespaces) or an ipBlock (here: only addresses outside the pod network, by CIDR and except). A named port in a rule is
resolved on the destination pod's container ports. Protocol defaults to TCP.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)  # named container ports


@dataclass
class External:
    """An address outside the pod network (a managed database, a chat API, an object store, the
    node-local DNS cache on its link-local address)."""
    name: str
    ip: str = "203.0.113.7"


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """metav1.LabelSelector semantics: an empty selector matches everything."""
    selector = selector or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}.get(op, False)
        if not ok:
            return False
    return True


def namespace_labels(namespace: str) -> dict[str, str]:
    # Set by the API server on every namespace since Kubernetes 1.22.
    return {"kubernetes.io/metadata.name": namespace}


def policy_types(policy: dict) -> list[str]:
    spec = policy.get("spec") or {}
    if spec.get("policyTypes"):
        return list(spec["policyTypes"])
    return ["Ingress"] + (["Egress"] if "egress" in spec else [])


class Policies:
    def __init__(self, policies: list[dict], namespace: str) -> None:
        self.policies = policies
        self.namespace = namespace  # where the (namespace-less) policies are applied

    def selecting(self, pod: Pod, direction: str) -> list[dict]:
        if pod.namespace != self.namespace:
            return []
        return [p for p in self.policies
                if direction in policy_types(p) and selector_matches((p.get("spec") or {}).get("podSelector"), pod.labels)]

    def _peer_matches(self, peer: dict, other: Pod | External) -> bool:
        if "ipBlock" in peer:
            if not isinstance(other, External):
                return False
            block = peer["ipBlock"]
            ip = ipaddress.ip_address(other.ip)
            inside = lambda cidr: ip in ipaddress.ip_network(cidr, strict=False)  # noqa: E731
            return inside(block["cidr"]) and not any(inside(c) for c in block.get("except") or [])
        if isinstance(other, External):
            return False
        if "namespaceSelector" in peer:
            if not selector_matches(peer["namespaceSelector"], namespace_labels(other.namespace)):
                return False
        elif other.namespace != self.namespace:
            return False
        return "podSelector" not in peer or selector_matches(peer["podSelector"], other.labels)

    @staticmethod
    def _port_matches(ports: list[dict] | None, dst: Pod | External, port: int | str, protocol: str) -> bool:
        if not ports:
            return True
        number = dst.ports.get(port) if isinstance(dst, Pod) and isinstance(port, str) else port
        for p in ports:
            if p.get("protocol", "TCP") != protocol:
                continue
            want = p.get("port")
            if want is None:
                return True
            if isinstance(want, str):
                want = dst.ports.get(want) if isinstance(dst, Pod) else None
            end = p.get("endPort", want)
            if want is not None and isinstance(number, int) and want <= number <= end:
                return True
        return False

    def _allowed(self, pod: Pod, other: Pod | External, dst: Pod | External, port, protocol, direction) -> bool:
        selecting = self.selecting(pod, direction) if isinstance(pod, Pod) else []
        if not selecting:
            return True  # not isolated
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for p in selecting:
            for rule in (p.get("spec") or {}).get(key) or []:
                peers = rule.get(peers_key)
                if peers and not any(self._peer_matches(x, other) for x in peers):
                    continue
                if self._port_matches(rule.get("ports"), dst, port, protocol):
                    return True
        return False

    def can_reach(self, src: Pod, dst: Pod | External, port: int | str, protocol: str = "TCP") -> bool:
        """Whether `src` may open a connection to `dst` on `port` (a number or a port name of
        dst): allowed out of src and into dst."""
        out = self._allowed(src, dst, dst, port, protocol, "Egress")
        inn = not isinstance(dst, Pod) or self._allowed(dst, src, dst, port, protocol, "Ingress")
        return out and inn
