//! Worker loss mid-job: a stage of the running chain is killed with SIGKILL at pseudo-random
//! token positions; the job moves to a replacement chain, replays its history, and the stream
//! continues with no token lost or repeated. When no capacity is left, the job ends with a
//! clear error.

use std::collections::HashMap;
use std::io::Read;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SOVRA: &str = env!("CARGO_BIN_EXE_sovra");

struct Fleet {
    dir: tempfile::TempDir,
    url: String,
    coordinator: Child,
    workers: HashMap<String, Child>,
    next_provider: usize,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
        for child in self.workers.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Fleet {
    fn coord(&self) -> PathBuf {
        self.dir.path().join("coordinator")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(SOVRA);
        c.args(args)
            .env("SOVRA_COORDINATOR", &self.url)
            .env("SOVRA_CA", self.coord().join("ca.pem"))
            .env("SOVRA_TOKEN_FILE", self.coord().join("admin.token"));
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "sovra {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    fn up(&self) -> Vec<String> {
        self.json(&["worker", "list"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "up")
            .map(|w| w["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// Adds a provider with one worker and waits until it is up; returns its worker id.
    fn add_worker(&mut self) -> String {
        let name = format!("dc-{}", self.next_provider);
        let country = ["FR", "DE", "NL", "BE", "AT"][self.next_provider % 5];
        self.next_provider += 1;
        self.ok(&["provider", "add", &name, "--country", country]);
        let token = self
            .ok(&["provider", "join-token", &name])
            .trim()
            .to_string();
        let before = self.up();
        let child = Command::new(SOVRA)
            .args([
                "--threads",
                "1",
                "worker",
                "start",
                "--coordinator",
                &self.url,
                "--listen",
                "127.0.0.1:0",
                "--join-token",
                &token,
                "--data-dir",
            ])
            .arg(self.dir.path().join(&name))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Held by the fleet at once, so it is killed and reaped whatever happens next.
        self.workers.insert(name.clone(), child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = self.up();
            if let Some(id) = now.iter().find(|id| !before.contains(id)) {
                let child = self.workers.remove(&name).expect("spawned above");
                self.workers.insert(id.clone(), child);
                return id.clone();
            }
            assert!(Instant::now() < deadline, "worker {name} did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn place_three_stages(&self) -> Vec<String> {
        self.ok(&["placement", "set", "smollm2", "--stages", "3"]);
        self.wait_ready()
    }

    fn wait_ready(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let p = self.json(&["placement", "show", "smollm2"]);
            let stages = p["chains"][0]["stages"].as_array().unwrap().clone();
            if stages.iter().all(|s| s["state"] == "ready") {
                return stages
                    .iter()
                    .map(|s| s["worker"].as_str().unwrap().to_string())
                    .collect();
            }
            assert!(Instant::now() < deadline, "placement not ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self, worker: &str) {
        let mut child = self.workers.remove(worker).expect("a worker we started");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

fn spawn_coordinator(dir: &std::path::Path, listen: &str) -> (Child, String) {
    let (coordinator, url) = sovra_tests::spawn_until_first_line(
        Command::new(SOVRA)
            .args([
                "coordinator",
                "start",
                "--listen",
                listen,
                "--lease",
                "1s",
                "--heartbeat",
                "200ms",
                "--data-dir",
            ])
            .arg(dir.join("coordinator")),
    );
    (coordinator, url.trim().to_string())
}

fn start_fleet(workers: usize) -> Fleet {
    sovra_tests::smollm2_path();
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, url) = spawn_coordinator(dir.path(), "127.0.0.1:0");
    let mut fleet = Fleet {
        dir,
        url,
        coordinator,
        workers: HashMap::new(),
        next_provider: 0,
    };
    for _ in 0..workers {
        fleet.add_worker();
    }
    fleet.ok(&[
        "model", "add", "smollm2", "--file", "smollm2", "--dtype", "q8_0",
    ]);
    fleet
}

/// Runs a job with `sovra run --json`, calling `on_token(index)` after each token line;
/// returns the token ids, the summary line and the stderr text.
fn run_job(
    fleet: &Fleet,
    tenant: &str,
    sampling: &[&str],
    mut on_token: impl FnMut(u64),
) -> (Vec<u64>, Value, bool) {
    let mut args = vec![
        "run",
        "-m",
        "smollm2",
        "--chat",
        "--ignore-eos",
        "--max-tokens",
        "40",
        "--json",
        "--token",
        tenant,
    ];
    args.extend_from_slice(sampling);
    args.push("Tell me about the history of Europe.");
    let mut child = fleet
        .cmd(&args)
        .env_remove("SOVRA_TOKEN_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut tokens = Vec::new();
    let mut last = Value::Null;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["type"] == "token" {
            assert_eq!(
                v["index"].as_u64().unwrap(),
                tokens.len() as u64,
                "no token lost or repeated"
            );
            tokens.push(v["token_id"].as_u64().unwrap());
            on_token(tokens.len() as u64 - 1);
        } else {
            last = v;
        }
    }
    let ok = child.wait().unwrap().success();
    (tokens, last, ok)
}

#[test]
fn killed_stages_are_replaced_and_the_stream_continues_exactly() {
    let mut fleet = start_fleet(4);
    let tenant = fleet.ok(&["tenant", "add", "acme"]).trim().to_string();
    let samplings: [&[&str]; 2] = [&[], &["--temperature", "0.8", "--seed", "7"]];
    fleet.place_three_stages();
    let reference: Vec<Vec<u64>> = samplings
        .iter()
        .map(|s| run_job(&fleet, &tenant, s, |_| {}).0)
        .collect();
    assert!(reference.iter().all(|r| r.len() == 40));

    let mut seed = 0x5eed_u64;
    let mut latencies = Vec::new();
    for round in 0..10 {
        seed = sovra_model::sampling::splitmix64(seed);
        let position = 3 + seed % 30;
        let chain = fleet.place_three_stages();
        let victim = chain[1 + (round % 2)].clone();
        let which = if round % 2 == 0 { "middle" } else { "tail" };
        println!("round {round}: killing the {which} stage {victim} after token {position}");
        let mut killed_at: Option<Instant> = None;
        let mut latency = None;
        let sampling = samplings[round % 2];
        let mut victim_child = fleet.workers.remove(&victim);
        let (tokens, summary, ok) = run_job(&fleet, &tenant, sampling, |index| {
            if index == position
                && let Some(mut child) = victim_child.take()
            {
                child.kill().unwrap();
                child.wait().unwrap();
                killed_at = Some(Instant::now());
            } else if let (Some(at), None) = (killed_at, latency) {
                latency = Some(at.elapsed());
            }
        });
        assert!(ok, "round {round}: the job failed: {summary}");
        assert_eq!(
            tokens,
            reference[round % 2],
            "round {round}: output differs from the fault-free run"
        );
        assert_eq!(summary["generated_tokens"], 40);
        let latency = latency.expect("a token after the kill");
        println!(
            "round {round}: next token {:.0} ms after the kill",
            latency.as_secs_f64() * 1e3
        );
        latencies.push(latency.as_secs_f64() * 1e3);
        fleet.add_worker();
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "kill → next token over {} kills: median {:.0} ms, max {:.0} ms",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    // Every job's audit shows the chains it ran on.
    let jobs = fleet.json(&["job", "list"]);
    let moved = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| {
            let audit = j["audit"].as_array().unwrap();
            // The second chain's lines say so, and from which token it ran the job.
            audit.len() > 3
                && audit[0]["attempt"] == 1
                && audit[0]["from_token"] == 0
                && audit.last().unwrap()["attempt"].as_u64() >= Some(2)
                && audit.last().unwrap()["from_token"].as_u64() > Some(0)
        })
        .count();
    assert!(moved >= 10, "the audit of each moved job lists both chains");
}

#[test]
fn a_stage_stopped_with_sigterm_is_left_out_of_the_next_chain() {
    let mut fleet = start_fleet(4);
    let tenant = fleet.ok(&["tenant", "add", "acme"]).trim().to_string();
    let chain = fleet.place_three_stages();
    let reference = run_job(&fleet, &tenant, &[], |_| {}).0;
    let victim = chain[1].clone();
    let mut child = fleet.workers.remove(&victim);
    let (tokens, summary, ok) = run_job(&fleet, &tenant, &[], |index| {
        if index == 10
            && let Some(c) = &child
        {
            // SIGTERM: the worker stops cleanly, telling the coordinator first.
            let sent = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .unwrap();
            assert!(sent.success());
        }
    });
    if let Some(mut c) = child.take() {
        assert!(c.wait().unwrap().success(), "the worker stops cleanly");
    }
    assert!(ok, "the job failed: {summary}");
    assert_eq!(tokens, reference, "output differs from the fault-free run");
    let job = summary["job_id"].as_str().unwrap();
    let audit = fleet.json(&["job", "get", job])["audit"].clone();
    let audit = audit.as_array().unwrap();
    let second: Vec<&str> = audit
        .iter()
        .filter(|a| a["attempt"] == 2)
        .map(|a| a["worker"].as_str().unwrap())
        .collect();
    assert_eq!(second.len(), 3, "{audit:?}");
    assert!(!second.contains(&victim.as_str()), "{audit:?}");
    assert!(
        audit.iter().all(|a| a["attempt"].as_u64() <= Some(2)),
        "moved once: {audit:?}"
    );
}

#[test]
fn a_job_with_no_capacity_left_ends_with_a_clear_error() {
    let mut fleet = start_fleet(1);
    let tenant = fleet.ok(&["tenant", "add", "acme"]).trim().to_string();
    let only = fleet.up().remove(0);
    fleet.wait_ready();
    let started = Instant::now();
    let mut killed = false;
    let mut args = vec![
        "run",
        "-m",
        "smollm2",
        "--chat",
        "--ignore-eos",
        "--max-tokens",
        "200",
        "--token",
        tenant.as_str(),
    ];
    args.push("Count to a thousand.");
    let mut child = fleet
        .cmd(&args)
        .env_remove("SOVRA_TOKEN_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut buf = [0u8; 1];
    while !killed {
        if out.read(&mut buf).unwrap() == 0 {
            break;
        }
        fleet.kill(&only);
        killed = true;
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&only) && stderr.contains("no capacity"),
        "{stderr}"
    );
    // The error names the job its header announced.
    let job_id = stderr
        .lines()
        .find_map(|l| l.strip_prefix('['))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no job header: {stderr}"));
    assert!(
        stderr.contains(&format!("error: {job_id} failed: ")),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "bounded time");
}

#[test]
fn a_coordinator_crash_ends_running_jobs_clearly_and_the_federation_resumes() {
    let mut fleet = start_fleet(3);
    let tenant = fleet.ok(&["tenant", "add", "acme"]).trim().to_string();
    fleet.place_three_stages();
    let reference = run_job(&fleet, &tenant, &[], |_| {}).0;
    let mut args = vec![
        "run",
        "-m",
        "smollm2",
        "--chat",
        "--ignore-eos",
        "--max-tokens",
        "4000",
        "--json",
        "--token",
        tenant.as_str(),
    ];
    args.push("Write a long essay about mountains.");
    let mut child = fleet
        .cmd(&args)
        .env_remove("SOVRA_TOKEN_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Tokens for a while (the coordinator writes a running job's progress every second).
    let mut received = Vec::new();
    let mut first = None;
    // From the first token: a second until its record is written, half a second until the
    // store flushes it, and a margin.
    while first.is_none_or(|t: Instant| t.elapsed() < Duration::from_millis(3000)) {
        let v: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(v["type"], "token", "{v}");
        received.push(v["token_id"].as_u64().unwrap());
        first.get_or_insert_with(Instant::now);
    }
    fleet.coordinator.kill().unwrap();
    fleet.coordinator.wait().unwrap();
    let killed_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // The workers stop computing the orphaned session at once (they did until its end).
    let cpu_ticks = |fleet: &Fleet| -> u64 {
        fleet
            .workers
            .values()
            .filter_map(|c| sovra_tests::proc_stat(&c.id().to_string()))
            .map(|s| s[11].parse::<u64>().unwrap() + s[12].parse::<u64>().unwrap())
            .sum()
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(&fleet);
    std::thread::sleep(Duration::from_secs(1));
    let busy = cpu_ticks(&fleet) - before;
    assert!(busy < 20, "the workers used {busy} ticks in a second");
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("connection to the coordinator was lost"),
        "{stderr}"
    );
    // The JSON error line names the job.
    let error_line: Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    assert_eq!(error_line["type"], "error", "{error_line}");
    assert!(
        error_line["job_id"]
            .as_str()
            .is_some_and(|j| j.starts_with("job-")),
        "{stderr}"
    );

    let port = fleet.url.rsplit(':').next().unwrap().to_string();
    let (coordinator, url) = spawn_coordinator(fleet.dir.path(), &format!("127.0.0.1:{port}"));
    fleet.coordinator = coordinator;
    assert_eq!(url, fleet.url);
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet.up().len() < 3 {
        assert!(Instant::now() < deadline, "workers did not reconnect");
        std::thread::sleep(Duration::from_millis(100));
    }
    let jobs = fleet.json(&["job", "list"]);
    let cut = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["state"] != "done")
        .expect("the cut job");
    assert_eq!(cut["state"], "failed");
    assert!(
        cut["error"]
            .as_str()
            .unwrap()
            .contains("coordinator restarted"),
        "{cut}"
    );
    // Where it ran is still on record: the audit of its chain survived the crash.
    let audit = cut["audit"].as_array().unwrap();
    assert!(
        !audit.is_empty() && audit.iter().all(|a| a["attempt"] == 1),
        "{cut}"
    );
    assert!(cut["prompt_tokens"].as_u64() > Some(0), "{cut}");
    // The tokens it had when the coordinator died are on record, up to the last second, and
    // it ended then (not at the restart, which came seconds later).
    let kept = fleet.json(&["job", "get", cut["job_id"].as_str().unwrap()]);
    let ended = kept["finished_unix"].as_u64().unwrap();
    assert!(
        ended > 0 && ended <= killed_unix,
        "ended {ended}, the coordinator was killed at {killed_unix}"
    );
    let kept: Vec<u64> = kept["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert!(
        !kept.is_empty() && received.starts_with(&kept),
        "kept {} of {} received tokens",
        kept.len(),
        received.len()
    );
    // The workers dropped the orphaned session's state.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let workers = fleet.json(&["worker", "list"]);
        if workers
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["open_sessions"] == 0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "sessions still open: {workers}");
        std::thread::sleep(Duration::from_millis(100));
    }
    fleet.wait_ready();
    assert_eq!(
        run_job(&fleet, &tenant, &[], |_| {}).0,
        reference,
        "the federation serves again"
    );
}
