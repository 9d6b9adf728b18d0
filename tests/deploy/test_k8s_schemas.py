"""Every object under deploy/k8s/ against the official Kubernetes schemas (kubernetes-validate,
strict: unknown fields fail too), for the releases maintained upstream when this was written.

The schemas ship inside the package, so this runs offline. kustomization.yaml is kustomize's
configuration, not a Kubernetes API object: it has no official schema and is checked by
test_manifests.test_kustomization_lists_every_manifest_but_the_one_off_job instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSIONS = ("1.35.0", "1.36.0", "1.37.0")


def _objects() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                meta = doc["metadata"]
                found.append((f"{path.name}:{doc['kind']}/{meta.get('name') or meta['generateName']}", doc))
    return found


OBJECTS = _objects()


def test_every_file_but_the_kustomization_holds_api_objects() -> None:
    files = {where.split(":")[0] for where, _ in OBJECTS}
    assert files == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("where", "doc"), OBJECTS, ids=[w for w, _ in OBJECTS])
def test_object_is_valid_for_kubernetes(where: str, doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where} is not a valid {doc['kind']} for Kubernetes {version}: {exc.message} "
                    f"at {'.'.join(map(str, exc.path))}")


def test_the_validator_rejects_an_unknown_field() -> None:
    (doc,) = [d for w, d in OBJECTS if w == "api.yaml:Deployment/recsys-api"]
    bad = {**doc, "spec": {**doc["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError, match="'replica' was unexpected"):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[0], strict=True)
