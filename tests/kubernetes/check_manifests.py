#!/usr/bin/python3
"""Offline checks of deploy/kubernetes/*.yaml (run by ctest as kubernetes_manifests).

Parses every document with PyYAML (Debian's python3-yaml) and checks the invariants the
deployment promises: several replicas on the PostgreSQL metadata store, each with its own audit
storage (a StatefulSet volumeClaimTemplate) and replica id, behind a headless Service; non-root, read-only root filesystem, no privilege escalation, all
capabilities dropped, seccomp RuntimeDefault; grpc.health.v1 probes; the PIN and the database
password from Secrets mounted as files; the PKCS#11 module from a volume; the metrics port
annotated for scraping and served over TLS (custodyd refuses clear text off loopback);
selectors of the Service, PodDisruptionBudget and NetworkPolicy matching the pods; ingress
admitted only from the AS's pods (and Prometheus on the metrics port); and every custodyd flag
and custodyctl flag used existing in the binaries just built.

kubectl --dry-run=client is not used: it needs an API server for discovery even in client mode.

usage: check_manifests.py MANIFEST_DIR CUSTODYD CUSTODYCTL
"""
import glob
import os
import re
import subprocess
import sys

import yaml

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)


def flags_of(binary, help_flag):
    out = subprocess.run([binary, help_flag], capture_output=True, text=True, timeout=30)
    return set(re.findall(r"--([a-z0-9_]+)", out.stdout + out.stderr))


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def main():
    manifest_dir, custodyd, custodyctl = sys.argv[1:4]
    docs = []
    files = sorted(glob.glob(os.path.join(manifest_dir, "*.yaml")))
    check(files, "no manifests found")
    for path in files:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc is None:
                    continue
                name = os.path.basename(path)
                for key in ("apiVersion", "kind", "metadata"):
                    check(key in doc, f"{name}: no {key}")
                check("name" in doc.get("metadata", {}), f"{name}: no metadata.name")
                if doc.get("kind") != "Namespace":
                    check(doc["metadata"].get("namespace") == "custody",
                          f"{name}: {doc.get('kind')} not in namespace custody")
                docs.append(doc)
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    for kind in ("StatefulSet", "Service", "PodDisruptionBudget", "NetworkPolicy",
                 "ServiceAccount", "ConfigMap"):
        check(len(by_kind.get(kind, [])) == 1, f"expected exactly one {kind}")
    check("Deployment" not in by_kind, "a Deployment: replicas need their own audit volumes")
    if failures:
        return

    sts = by_kind["StatefulSet"][0]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    annotations = spec["template"]["metadata"].get("annotations", {})
    check(spec["replicas"] >= 3, "fewer than 3 replicas")
    check(labels_match(spec["selector"]["matchLabels"], pod_labels), "StatefulSet selector")
    check(spec.get("updateStrategy", {}).get("type") == "RollingUpdate", "not RollingUpdate")
    svc = by_kind["Service"][0]
    check(spec.get("serviceName") == svc["metadata"]["name"], "serviceName is not the Service")
    check(svc["spec"].get("clusterIP") == "None",
          "Service not headless: callers must resolve every replica")
    templates = {t["metadata"]["name"]: t for t in spec.get("volumeClaimTemplates", [])}

    psc = pod.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, "pod runAsNonRoot")
    check(psc.get("runAsUser", 0) != 0, "pod runAsUser must not be 0")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccomp RuntimeDefault")
    check(pod.get("automountServiceAccountToken") is False, "service account token mounted")
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        check(not pod.get(host), f"{host} set")

    volumes = {v["name"]: v for v in pod["volumes"]}
    volumes.update({name: {"name": name, "persistentVolumeClaim": {}} for name in templates})
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext", {})
        n = c["name"]
        check(sc.get("allowPrivilegeEscalation") is False, f"{n}: allowPrivilegeEscalation")
        check(sc.get("readOnlyRootFilesystem") is True, f"{n}: readOnlyRootFilesystem")
        check(sc.get("privileged", False) is False, f"{n}: privileged")
        check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{n}: capabilities not dropped")
        check(not sc.get("capabilities", {}).get("add"), f"{n}: capabilities added")
        for m in c.get("volumeMounts", []):
            check(m["name"] in volumes, f"{n}: mount of undefined volume {m['name']}")

    (custody,) = [c for c in pod["containers"] if c["name"] == "custodyd"]
    args = custody["args"]
    flags = {}
    for a in args:
        check(a.startswith("--") and "=" in a, f"custodyd arg not --flag=value: {a}")
        k, _, v = a[2:].partition("=")
        flags[k] = v
    known = flags_of(custodyd, "--helpfull")
    for k in flags:
        check(k in known, f"custodyd has no flag --{k}")
    for forbidden in ("pin", "pin_value", "password"):
        check(forbidden not in flags, f"secret on the command line: --{forbidden}")
    check(not any("pin" in e.get("name", "").lower() and "value" in e
                  for e in custody.get("env", [])), "PIN in a literal env value")

    mounts = {m["mountPath"]: m for m in custody["volumeMounts"]}

    # Replicas: metadata in PostgreSQL (a connection string from the ConfigMap, never a URI with a
    # password), the password from a file, a replica id per pod, the state directory (audit log)
    # on the replica's own claim.
    check(flags.get("metadata", "").startswith("/"), "--metadata is not a connection-string file")
    check("metadata_password_file" in flags, "no --metadata_password_file")
    check(flags.get("replica_id") == "$(POD_NAME)", "--replica_id is not the pod name")
    pod_name_env = [e for e in custody.get("env", []) if e.get("name") == "POD_NAME"]
    check(pod_name_env and pod_name_env[0].get("valueFrom", {}).get("fieldRef", {})
          .get("fieldPath") == "metadata.name", "POD_NAME is not the pod's name")
    state_mount = mounts.get(flags.get("state_dir", ""))
    check(state_mount is not None and state_mount["name"] in templates,
          "the state directory (audit log) is not on a per-replica claim")

    def volume_under(path):
        """The volume (and mount) a file path lives in: the longest mount path prefix."""
        best = None
        for mp, m in mounts.items():
            if path == mp or path.startswith(mp.rstrip("/") + "/"):
                if best is None or len(mp) > len(best[1]["mountPath"]):
                    best = (volumes[m["name"]], m)
        return best

    # PIN and DB password: Secret volumes mounted as single files (subPath: no symlink,
    # custodyd opens with O_NOFOLLOW), group-readable at most.
    for path, secret_name in ((flags.get("pin_file", ""), "custody-hsm-pin"),
                              ("/run/custody/secrets/db-password", "custody-db")):
        found = volume_under(path)
        check(found is not None, f"{path}: not on a volume")
        if found:
            vol, mount = found
            check(vol.get("secret", {}).get("secretName") == secret_name,
                  f"{path}: not from Secret {secret_name}")
            check(mount.get("subPath") and mount["mountPath"] == path,
                  f"{path}: mount the Secret key with subPath as this file")
            check(vol["secret"].get("defaultMode", 0o644) & 0o037 == 0,
                  f"{path}: Secret mode wider than 0440")
    module = volume_under(flags.get("pkcs11_module", "/nonexistent"))
    check(module is not None and module[1].get("readOnly"),
          "PKCS#11 module not from a read-only volume")

    # TLS everywhere off loopback; metrics annotated on the port custodyd serves them on.
    check(all(k in flags for k in ("tls_cert", "tls_key", "client_ca")), "gRPC without mTLS")
    metrics_port = flags.get("metrics_listen", ":").rsplit(":", 1)[1]
    check(annotations.get("prometheus.io/scrape") == "true", "metrics not annotated for scraping")
    check(annotations.get("prometheus.io/port") == metrics_port, "prometheus.io/port != metrics port")
    check(annotations.get("prometheus.io/scheme") == "https", "metrics scraped in clear")
    ports = {p["name"]: p["containerPort"] for p in custody["ports"]}
    check(str(ports.get("metrics")) == metrics_port, "metrics containerPort")
    check(str(ports.get("grpc")) == flags.get("listen", ":").rsplit(":", 1)[1], "grpc containerPort")

    # Probes: grpc.health.v1 through custodyctl, over mTLS to custodyd's own port.
    ctl_flags = flags_of(custodyctl, "--help")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        cmd = custody.get(probe, {}).get("exec", {}).get("command", [])
        check(cmd[:1] == ["/usr/bin/custodyctl"] and cmd[-1:] == ["health"],
              f"{probe}: not custodyctl health")
        for a in cmd[1:-1]:
            check(a.startswith("--") and a[2:].split("=")[0] in ctl_flags,
                  f"{probe}: custodyctl has no flag {a}")
        check(f"--addr=127.0.0.1:{ports.get('grpc')}" in cmd, f"{probe}: wrong address")

    svc = by_kind["Service"][0]
    check(labels_match(svc["spec"]["selector"], pod_labels), "Service selector")
    check({p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports), "Service targetPort")
    pdb = by_kind["PodDisruptionBudget"][0]
    check(labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels), "PDB selector")
    check("maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"], "PDB without a budget")

    # NetworkPolicy: ingress only from the AS (gRPC) and Prometheus (metrics), never from all.
    np = by_kind["NetworkPolicy"][0]["spec"]
    check(labels_match(np["podSelector"]["matchLabels"], pod_labels), "NetworkPolicy selector")
    check("Ingress" in np["policyTypes"], "NetworkPolicy does not restrict ingress")
    allowed = {}
    for rule in np["ingress"]:
        check(rule.get("from"), "an ingress rule admits every source")
        for peer in rule.get("from", []):
            check(peer.get("podSelector", {}).get("matchLabels"),
                  "an ingress peer is not restricted to labelled pods")
            check("ipBlock" not in peer, "ingress from an ipBlock")
        for p in rule.get("ports", []):
            app = rule["from"][0]["podSelector"]["matchLabels"].get("app.kubernetes.io/name")
            allowed.setdefault(p["port"], set()).add(app)
    check(allowed.get(ports.get("grpc")) == {"authorization-server"}, f"gRPC ingress: {allowed}")
    check(allowed.get(ports.get("metrics")) == {"prometheus"}, f"metrics ingress: {allowed}")
    check(set(allowed) == {ports.get("grpc"), ports.get("metrics")}, "other ports admitted")

    # The connection string: from the ConfigMap, without a password.
    conninfo = volume_under(flags.get("metadata", "/nonexistent"))
    check(conninfo is not None and "configMap" in conninfo[0], "conninfo not from the ConfigMap")
    if conninfo is not None and "configMap" in conninfo[0]:
        key = conninfo[1].get("subPath") or os.path.relpath(flags["metadata"],
                                                             conninfo[1]["mountPath"])
        (cm,) = [d for d in by_kind["ConfigMap"]
                 if d["metadata"]["name"] == conninfo[0]["configMap"]["name"]]
        text = cm.get("data", {}).get(key, "")
        check(text and "password" not in text.lower(), f"conninfo {key}: missing or has a password")
        check("sslmode=verify-full" in text, f"conninfo {key}: not sslmode=verify-full")

    # Everything the pod references is defined here or is an operator-made Secret.
    check(pod["serviceAccountName"] in {d["metadata"]["name"] for d in by_kind["ServiceAccount"]},
          "ServiceAccount not defined")
    for v in volumes.values():
        if "configMap" in v:
            check(v["configMap"]["name"] in {d["metadata"]["name"] for d in by_kind["ConfigMap"]},
                  f"ConfigMap {v['configMap']['name']} not defined")
        if v.get("persistentVolumeClaim", {}).get("claimName"):
            check(v["persistentVolumeClaim"]["claimName"] in
                  {d["metadata"]["name"] for d in by_kind.get("PersistentVolumeClaim", [])},
                  "PVC not defined")
    policy = volume_under(flags.get("policy_file", "/nonexistent"))
    check(policy is not None and "configMap" in policy[0], "policy not from the ConfigMap")
    # custodyd opens the policy with O_NOFOLLOW: a ConfigMap directory mount is a ..data symlink.
    check(policy is not None and policy[1].get("subPath")
          and policy[1]["mountPath"] == flags.get("policy_file"),
          "policy: mount the ConfigMap key with subPath as this file (no symlink)")


if __name__ == "__main__":
    main()
    for f in failures:
        print("FAIL:", f)
    print(f"{'0 failed' if not failures else str(len(failures)) + ' failed'}")
    sys.exit(1 if failures else 0)
