"""Helm and checkov for tests/deploy_chart.rs: real Helm v4 (the Go SDK
through helm-python-sdk's libhelm_c, offline) and checkov, both from the
virtualenv that ./test.sh installs. Every command prints one JSON document.

    chart.py lint                  lint (strict) the defaults and every example
    chart.py render [VALUES.yaml]  the rendered objects, YAML parsed
    chart.py schema VALUES.json    whether the schema accepts these values
    chart.py scan                  checkov's failed checks over the defaults
                                   and every example, rendered
"""

import glob
import json
import os
import subprocess
import sys
import tempfile

import helm_python as helm
import yaml

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "charts", "portless")
RELEASE = {"name": "pl", "namespace": "portless", "is_install": True}


def examples():
    return sorted(glob.glob(os.path.join(CHART, "examples", "*.yaml")))


def values_of(path):
    if path is None:
        return None
    with open(path) as f:
        return helm.values_from_yaml(f.read())


def render(values):
    chart = helm.Chart.load(CHART)
    return {k: v for k, v in chart.render(values, **RELEASE).items() if k.endswith(".yaml") and v.strip()}


def cmd_lint():
    report = {}
    for path in [None] + examples():
        r = helm.lint(CHART, values_of(path), strict=True, namespace="portless")
        report[os.path.basename(path) if path else "defaults"] = r
    return report


def cmd_render(path=None):
    objects = []
    for source, text in sorted(render(values_of(path)).items()):
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__source"] = source
                objects.append(doc)
    return objects


def cmd_schema(path):
    with open(path) as f:
        values = json.load(f)
    chart = helm.Chart.load(CHART)
    try:
        chart.validate_schema(values)
    except helm.HelmError as e:
        return {"ok": False, "error": str(e)}
    # Accepted values must also render (what `helm template` does).
    try:
        chart.render(values, **RELEASE)
    except helm.HelmError as e:
        return {"ok": False, "error": "schema accepted, render failed: " + str(e)}
    return {"ok": True}


def cmd_scan():
    with tempfile.TemporaryDirectory() as d:
        for path in [None] + examples():
            name = os.path.basename(path)[:-5] if path else "defaults"
            with open(os.path.join(d, name + ".yaml"), "w") as f:
                for source, text in sorted(render(values_of(path)).items()):
                    f.write("---\n# Source: %s (%s)\n%s\n" % (source, name, text))
        checkov = os.path.join(os.path.dirname(sys.executable), "checkov")
        out = subprocess.run(
            [checkov, "-d", d, "--framework", "kubernetes", "--output", "json", "--quiet", "--compact"],
            capture_output=True,
            text=True,
        )
        # checkov exits 1 when a check fails; anything else is its own error.
        if out.returncode not in (0, 1):
            raise SystemExit("checkov failed (%d): %s" % (out.returncode, out.stderr[-2000:]))
        results = json.loads(out.stdout)
        if isinstance(results, list):
            results = {"results": {"failed_checks": [c for r in results for c in r["results"]["failed_checks"]]}, "summary": {}}
        failed = results["results"]["failed_checks"]
        return {
            "summary": results.get("summary", {}),
            "failed": sorted({(c["check_id"], c["check_name"]) for c in failed}),
            "files": sorted({os.path.basename(c["file_path"]) for c in failed}),
        }


def main(argv):
    cmd, args = argv[0], argv[1:]
    result = {"lint": cmd_lint, "render": cmd_render, "schema": cmd_schema, "scan": cmd_scan}[cmd](*args)
    json.dump(result, sys.stdout, indent=1, default=list)


if __name__ == "__main__":
    main(sys.argv[1:])
