//! The real binaries as an operator runs them: a coordinator process, worker processes of two
//! providers, the CLI against them; then the coordinator is killed with SIGKILL and restarted on
//! the same data dir, and everything is still there.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SOVRA: &str = env!("CARGO_BIN_EXE_sovra");

struct Cluster {
    dir: tempfile::TempDir,
    url: String,
    children: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Cluster {
    fn coord_dir(&self) -> PathBuf {
        self.dir.path().join("coordinator")
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(SOVRA)
            .args(args)
            .env("SOVRA_COORDINATOR", &self.url)
            .env("SOVRA_CA", self.coord_dir().join("ca.pem"))
            .env("SOVRA_TOKEN_FILE", self.coord_dir().join("admin.token"))
            .output()
            .expect("running sovra")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "sovra {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `sovra ARGS` with `token` given on the command line (over the environment's).
    fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        Command::new(SOVRA)
            .args(args)
            .args(["--coordinator", &self.url, "--token", token, "--ca"])
            .arg(self.coord_dir().join("ca.pem"))
            .output()
            .expect("running sovra")
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.ok(&all)).expect("JSON output")
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut check: impl FnMut(&Cluster) -> bool) {
        let deadline = Instant::now() + timeout;
        while !check(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Starts a coordinator process on `listen` and returns it with its URL (its first stdout line).
fn start_coordinator(data_dir: &Path, listen: &str) -> (Child, String) {
    let mut child = Command::new(SOVRA)
        .args(["coordinator", "start", "--data-dir"])
        .arg(data_dir)
        .args([
            "--listen",
            listen,
            "--lease",
            "2s",
            "--heartbeat",
            "300ms",
            "--kv-reserve-tokens",
            "256",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the coordinator");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("coordinator URL");
    (child, line.trim().to_string())
}

fn start_worker(cluster: &Cluster, name: &str, threads: &str, token: Option<&str>) -> Child {
    let mut cmd = Command::new(SOVRA);
    cmd.args([
        "--threads",
        threads,
        "worker",
        "start",
        "--coordinator",
        &cluster.url,
        "--data-dir",
    ])
    .arg(cluster.dir.path().join(name))
    .args(["--listen", "127.0.0.1:0", "--max-memory", "1GiB"])
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(cluster.dir.path().join(format!("{name}.log"))).unwrap());
    if let Some(t) = token {
        cmd.args(["--join-token", t]);
    }
    cmd.spawn().expect("starting a worker")
}

fn links(c: &Cluster) -> Vec<Value> {
    c.json(&["worker", "links"]).as_array().unwrap().clone()
}

fn workers_up(c: &Cluster) -> Vec<Value> {
    c.json(&["worker", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "up")
        .cloned()
        .collect()
}

#[test]
fn operator_workflow_survives_a_coordinator_sigkill() {
    sovra_tests::smollm2_path();
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, url) = start_coordinator(&dir.path().join("coordinator"), "127.0.0.1:0");
    let mut cluster = Cluster {
        dir,
        url,
        children: vec![coordinator],
    };
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(cluster.coord_dir().join("admin.token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);

    cluster.ok(&[
        "provider",
        "add",
        "ovh-fr",
        "--country",
        "FR",
        "--cert",
        "ISO27001,SecNumCloud",
    ]);
    cluster.ok(&[
        "provider",
        "add",
        "ionos-de",
        "--country",
        "DE",
        "--cert",
        "ISO27001",
    ]);
    let tenant_token = cluster.ok(&["tenant", "add", "acme"]).trim().to_string();
    let fr_token = cluster
        .ok(&["provider", "join-token", "ovh-fr", "--ttl", "10m"])
        .trim()
        .to_string();
    let de_token = cluster
        .ok(&["provider", "join-token", "ionos-de"])
        .trim()
        .to_string();

    // One worker at a time, so each measures its speed on an otherwise idle machine.
    let w1 = start_worker(&cluster, "w-fr", "1", Some(&fr_token));
    cluster.children.push(w1);
    cluster.wait_for("the 1-thread worker", Duration::from_secs(60), |c| {
        workers_up(c).len() == 1
    });
    let w2 = start_worker(&cluster, "w-de", "2", Some(&de_token));
    cluster.children.push(w2);
    cluster.wait_for("the 2-thread worker", Duration::from_secs(60), |c| {
        workers_up(c).len() == 2
    });
    let workers = workers_up(&cluster);
    // A worker says on stderr that it joined and whom it serves.
    let log = std::fs::read_to_string(cluster.dir.path().join("w-fr.log")).unwrap();
    assert!(
        log.contains("joined the federation") && log.contains("ovh-fr"),
        "{log}"
    );
    let speed = |provider: &str| {
        workers.iter().find(|w| w["provider"] == provider).unwrap()["speed_gflops"]
            .as_f64()
            .unwrap()
    };
    println!(
        "speed: 1 thread {:.1}, 2 threads {:.1} GFLOP/s",
        speed("ovh-fr"),
        speed("ionos-de")
    );
    assert!(
        speed("ovh-fr") < speed("ionos-de"),
        "1 thread {} vs 2 threads {} GFLOP/s",
        speed("ovh-fr"),
        speed("ionos-de")
    );

    // Each worker measured its round trip to the other's data plane (loopback: under a second
    // even on a loaded machine).
    cluster.wait_for("both links measured", Duration::from_secs(60), |c| {
        c.json(&["worker", "links"]).as_array().unwrap().len() == 2
    });
    for link in links(&cluster) {
        let rtt = link["rtt_us"].as_u64().unwrap_or(0);
        assert!(rtt > 0 && rtt < 1_000_000, "{link}");
        assert_ne!(link["from"], link["to"]);
    }

    // A tenant token is refused for operator commands, with a one-line reason.
    let out = cluster.cli_as(&tenant_token, &["provider", "list"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("acme") && stderr.trim().lines().count() == 1,
        "{stderr}"
    );

    cluster.ok(&[
        "model",
        "add",
        "smollm2",
        "--file",
        "smollm2",
        "--dtype",
        "q8_0",
        "--country",
        "FR,DE",
    ]);
    let placement = cluster.json(&["placement", "show", "smollm2"]);
    assert_eq!(placement["version"], 1);
    cluster.wait_for("the slices to load", Duration::from_secs(60), |c| {
        let p = c.json(&["placement", "show", "smollm2"]);
        p["chains"][0]["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "ready")
    });
    // Tenants' limits of jobs at once, set at creation or later, survive the restart below.
    cluster.ok(&["tenant", "add", "beta", "--max-jobs", "3"]);
    cluster.ok(&["tenant", "limit", "acme", "--max-jobs", "5"]);
    let limits: Vec<(String, u64, u64)> = cluster
        .json(&["tenant", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["max_running_jobs"].as_u64().unwrap(),
                t["own_max_running_jobs"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(limits, [("acme".into(), 5, 5), ("beta".into(), 3, 3)]);
    let before = [
        cluster.json(&["provider", "list"]),
        cluster.json(&["tenant", "list"]),
        cluster.json(&["model", "list"]),
        cluster.json(&["placement", "show", "smollm2"])["chains"].clone(),
    ];

    // SIGKILL the coordinator and restart it on the same data dir and port.
    let port = cluster.url.rsplit(':').next().unwrap().to_string();
    let mut old = cluster.children.remove(0);
    old.kill().unwrap();
    old.wait().unwrap();
    let (coordinator, url) = start_coordinator(&cluster.coord_dir(), &format!("127.0.0.1:{port}"));
    assert_eq!(url, cluster.url);
    cluster.children.insert(0, coordinator);

    // A job submitted at once waits for the workers to reconnect (instead of failing or
    // replanning the model around them).
    let at_once = cluster.cli_as(
        &tenant_token,
        &[
            "run",
            "-m",
            "smollm2",
            "--max-tokens",
            "4",
            "--json",
            "Hello",
        ],
    );
    assert!(
        at_once.status.success(),
        "{}",
        String::from_utf8_lossy(&at_once.stderr)
    );

    // The workers reconnect by themselves.
    cluster.wait_for("both workers back up", Duration::from_secs(60), |c| {
        workers_up(c).len() == 2
    });
    let after_providers = cluster.json(&["provider", "list"]);
    assert_eq!(after_providers, before[0]);
    assert_eq!(cluster.json(&["tenant", "list"]), before[1]);
    assert_eq!(cluster.json(&["model", "list"]), before[2]);
    let placement = cluster.json(&["placement", "show", "smollm2"]);
    assert_eq!(placement["version"], 1);
    let strip_state = |chains: &Value| -> Vec<(String, String)> {
        chains[0]["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["worker"].to_string(), s["layers"].to_string()))
            .collect()
    };
    assert_eq!(strip_state(&placement["chains"]), strip_state(&before[3]));
    // Reconnected workers receive their assignments again and report ready, with the slices
    // they held (nothing read again).
    cluster.wait_for(
        "the slices to be ready again",
        Duration::from_secs(60),
        |c| {
            let p = c.json(&["placement", "show", "smollm2"]);
            p["chains"][0]["stages"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["state"] == "ready")
        },
    );
    let placement = cluster.json(&["placement", "show", "smollm2"]);
    for stage in placement["chains"][0]["stages"].as_array().unwrap() {
        let message = stage["message"].as_str().unwrap();
        assert!(
            message.ends_with("loaded (kept over the reconnection)"),
            "{placement}"
        );
    }
    // The tenant's token still authenticates after the restart.
    let out = cluster.cli_as(&tenant_token, &["model", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A used join token stays used across the restart.
    let reuse = start_worker(&cluster, "w-again", "1", Some(&fr_token));
    let output = reuse.wait_with_output().unwrap();
    assert!(!output.status.success());

    // Removing the model while one worker is cut off (stopped until its lease runs out): the
    // other drops its slice at once, the cut-off one as soon as it is back and hears that it
    // holds no assignment. Both give the memory back.
    let pids: Vec<u32> = cluster.children[1..3].iter().map(|c| c.id()).collect();
    let loaded: Vec<u64> = pids.iter().map(|&p| resident_bytes(p)).collect();
    let signal = |sig: &str, pid: u32| {
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP", pids[1]);
    cluster.wait_for(
        "the stopped worker to be down",
        Duration::from_secs(30),
        |c| workers_up(c).len() == 1,
    );
    let said = cluster.ok(&["model", "remove", "smollm2"]);
    signal("-CONT", pids[1]);
    assert!(said.contains("smollm2 removed"), "{said}");
    assert_eq!(cluster.json(&["model", "list"]), serde_json::json!([]));
    let shown = cluster.cli(&["placement", "show", "smollm2"]);
    assert!(!shown.status.success());
    let stderr = String::from_utf8_lossy(&shown.stderr);
    assert!(stderr.contains("smollm2"), "{stderr}");
    let log = |name: &str| std::fs::read_to_string(cluster.dir.path().join(name)).unwrap();
    cluster.wait_for(
        "both workers to drop their slices",
        Duration::from_secs(30),
        |_| {
            log("w-fr.log").contains("slice dropped")
                && log("w-de.log").contains("slice dropped: no longer assigned")
        },
    );
    cluster.wait_for(
        "the workers to free their slices' memory",
        Duration::from_secs(30),
        |_| {
            pids.iter()
                .zip(&loaded)
                .all(|(&p, &was)| resident_bytes(p) + (20 << 20) < was)
        },
    );
    let gone = cluster.cli(&["model", "remove", "smollm2"]);
    assert!(!gone.status.success());

    // The operator token is replaced: the old one stops working, the coordinator's admin.token
    // holds the new one.
    let token_file = cluster.coord_dir().join("admin.token");
    let old = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let new = cluster
        .ok(&["coordinator", "rotate-token"])
        .trim()
        .to_string();
    assert!(new.starts_with("sovra-op-") && new != old, "{new}");
    assert_eq!(std::fs::read_to_string(&token_file).unwrap().trim(), new);
    let refused = cluster.cli_as(&old, &["provider", "list"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not valid"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(cluster.cli_as(&new, &["provider", "list"]).status.success());

    // A CA file that is not this federation's, or no certificate at all, is named as such.
    let other = cluster.dir.path().join("other-ca.pem");
    let foreign = sovra_proto::ca::FederationCa::generate("elsewhere").unwrap();
    std::fs::write(&other, foreign.cert_pem()).unwrap();
    let not_pem = cluster.dir.path().join("not-a-cert.txt");
    std::fs::write(&not_pem, "hello").unwrap();
    for (ca, expected) in [
        (&other, "not signed by the CA in"),
        (&not_pem, "holds no PEM certificate"),
    ] {
        let out = Command::new(SOVRA)
            .args([
                "provider",
                "list",
                "--coordinator",
                &cluster.url,
                "--token",
                &new,
            ])
            .arg("--ca")
            .arg(ca)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }

    // SIGTERM stops the coordinator gracefully, its workers still connected.
    let pid = cluster.children[0].id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = cluster.children[0].try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator did not stop within 15 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
}

/// Resident memory of a process, bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap();
    kib << 10
}
