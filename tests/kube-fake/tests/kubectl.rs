//! The real `kubectl` (1.32) against kube-fake: apply (client-side and server-side),
//! get (tables), get -w, describe, label, delete.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const KUBECTL: &str = "/usr/bin/kubectl";

/// A kubeconfig file for one server, removed on drop.
struct Kubeconfig(PathBuf);

impl Kubeconfig {
    fn write(server: &kube_fake::Server, test: &str) -> Kubeconfig {
        let path =
            std::env::temp_dir().join(format!("kube-fake-{test}-{}.yaml", std::process::id()));
        server.write_kubeconfig(&path).expect("kubeconfig written");
        Kubeconfig(path)
    }
}

impl Drop for Kubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn command(kubeconfig: &Path, args: &[&str]) -> Command {
    assert!(
        Path::new(KUBECTL).exists(),
        "{KUBECTL} is needed for this test; install kubectl 1.32"
    );
    let mut cmd = Command::new(KUBECTL);
    cmd.env("KUBECONFIG", kubeconfig)
        .env("HOME", std::env::temp_dir())
        .args(args)
        .arg("--request-timeout=10s")
        .kill_on_drop(true);
    cmd
}

/// Runs kubectl; returns (success, stdout, stderr).
async fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut cmd = command(kubeconfig, args);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("kubectl starts");
    if let Some(input) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes())
            .await
            .expect("stdin written");
    }
    drop(child.stdin.take());
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("kubectl {args:?} took more than 30 s"))
        .expect("kubectl output");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn ok(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let (success, stdout, stderr) = kubectl(kubeconfig, args, stdin).await;
    assert!(success, "kubectl {args:?} failed: {stderr}{stdout}");
    stdout
}

const MANIFEST: &str = "apiVersion: v1
kind: Service
metadata:
  name: kdemo
  labels:
    app: kdemo
spec:
  type: LoadBalancer
  selector:
    app: kdemo
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

fn node_ports(service_json: &str) -> Vec<i64> {
    let svc: serde_json::Value =
        serde_json::from_str(service_json).expect("kubectl -o json prints JSON");
    svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["nodePort"].as_i64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_get_describe_label_delete() {
    let server = kube_fake::Server::start().await.expect("kube-fake starts");
    let kc = Kubeconfig::write(&server, "crud");
    let kc = kc.0.as_path();

    assert_eq!(
        ok(kc, &["apply", "-f", "-"], Some(MANIFEST)).await.trim(),
        "service/kdemo created"
    );
    let ports = node_ports(&ok(kc, &["get", "svc", "kdemo", "-o", "json"], None).await);
    assert!(
        ports.len() == 1 && (30000..=32767).contains(&ports[0]),
        "apply gives a node port: {ports:?}"
    );

    // Applying again with a second port is a strategic merge patch.
    let v2 = MANIFEST.replace(
        "    targetPort: 8080\n",
        "    targetPort: 8080\n  - name: https\n    port: 443\n",
    );
    assert_eq!(
        ok(kc, &["apply", "-f", "-"], Some(&v2)).await.trim(),
        "service/kdemo configured"
    );
    let ports_v2 = node_ports(&ok(kc, &["get", "svc", "kdemo", "-o", "json"], None).await);
    assert_eq!(ports_v2.len(), 2, "the second port got a node port");
    assert_eq!(ports_v2[0], ports[0], "the first node port is kept");

    let ssa = MANIFEST.replace("kdemo", "kdemo-ssa");
    assert_eq!(
        ok(kc, &["apply", "--server-side", "-f", "-"], Some(&ssa))
            .await
            .trim(),
        "service/kdemo-ssa serverside-applied"
    );

    let table = ok(kc, &["get", "svc"], None).await;
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("kdemo "))
        .expect("kdemo row")
        .split_whitespace()
        .collect();
    assert_eq!(row[1], "LoadBalancer");
    assert_eq!(row[3], "<pending>");
    assert_eq!(
        row[4],
        format!("80:{}/TCP,443:{}/TCP", ports_v2[0], ports_v2[1])
    );
    assert!(
        table.lines().any(|l| l.starts_with("kubernetes ")
            && l.contains("10.96.0.1")
            && l.contains("443/TCP"))
    );

    assert_eq!(
        ok(kc, &["label", "svc", "kdemo", "tier=edge"], None)
            .await
            .trim(),
        "service/kdemo labeled"
    );
    let status = r#"{"status":{"loadBalancer":{"ingress":[{"ip":"198.51.100.60"}]}}}"#;
    ok(
        kc,
        &[
            "patch",
            "svc",
            "kdemo",
            "--subresource=status",
            "--type=merge",
            "-p",
            status,
        ],
        None,
    )
    .await;

    let described = ok(kc, &["describe", "svc", "kdemo"], None).await;
    for expected in [
        "Name:                     kdemo",
        "tier=edge",
        "Type:                     LoadBalancer",
        "LoadBalancer Ingress:     198.51.100.60",
        "NodePort:",
    ] {
        assert!(
            described.contains(expected),
            "describe lacks {expected:?}:\n{described}"
        );
    }

    assert_eq!(ok(kc, &["get", "nodes"], None).await.trim(), "", "no nodes");
    let deleted = ok(kc, &["delete", "svc", "kdemo", "kdemo-ssa"], None).await;
    assert!(
        deleted.contains("service \"kdemo\" deleted")
            && deleted.contains("service \"kdemo-ssa\" deleted"),
        "{deleted}"
    );
    let (success, _, stderr) = kubectl(kc, &["get", "svc", "kdemo"], None).await;
    assert!(
        !success && stderr.contains("NotFound"),
        "after delete, get says NotFound: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_watch_prints_changes() {
    let server = kube_fake::Server::start().await.expect("kube-fake starts");
    let kc = Kubeconfig::write(&server, "watch");
    let kc = kc.0.as_path();
    ok(kc, &["apply", "-f", "-"], Some(MANIFEST)).await;

    let mut watcher = command(kc, &["get", "svc", "-w"]);
    watcher.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = watcher.spawn().expect("kubectl get -w starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    let read = async {
        // Header, kdemo and kubernetes from the list, then the change.
        while seen.len() < 3 {
            seen.push(
                lines
                    .next_line()
                    .await
                    .expect("read")
                    .expect("kubectl still running"),
            );
        }
        let status = r#"{"status":{"loadBalancer":{"ingress":[{"ip":"198.51.100.61"}]}}}"#;
        ok(
            kc,
            &[
                "patch",
                "svc",
                "kdemo",
                "--subresource=status",
                "--type=merge",
                "-p",
                status,
            ],
            None,
        )
        .await;
        loop {
            let line = lines
                .next_line()
                .await
                .expect("read")
                .expect("kubectl still running");
            let done = line.contains("198.51.100.61");
            seen.push(line);
            if done {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .unwrap_or_else(|_| panic!("kubectl get -w did not print the change; saw {seen:?}"));
    child.kill().await.expect("kubectl killed");
    assert!(seen[0].starts_with("NAME"), "{seen:?}");
    assert!(
        seen.last()
            .is_some_and(|l| l.starts_with("kdemo") && l.contains("198.51.100.61")),
        "{seen:?}"
    );
}
