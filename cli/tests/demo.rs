//! The README's run command: `sovra demo` streams, through a coordinator and three worker
//! processes of three providers, exactly what `sovra generate --local --chat` gives.

use std::process::Command;

use serde_json::Value;

fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn demo_streams_what_local_generation_gives() {
    sovra_tests::smollm2_path();
    let sovra = env!("CARGO_BIN_EXE_sovra");
    let common = [
        "--json",
        "--ignore-eos",
        "--max-tokens",
        "12",
        "--temperature",
        "0.7",
        "--seed",
        "3",
    ];
    let demo = Command::new(sovra)
        .arg("demo")
        .args(common)
        .arg("What is the capital of France?")
        .output()
        .unwrap();
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    let local = Command::new(sovra)
        .args(["generate", "--local", "-m", "smollm2", "--chat"])
        .args(common)
        .arg("What is the capital of France?")
        .output()
        .unwrap();
    assert!(local.status.success());
    let (demo, local) = (json_lines(&demo.stdout), json_lines(&local.stdout));
    assert_eq!(demo.len(), 13);
    assert_eq!(demo[..12], local[..12], "token lines are identical");
    let (d, l) = (&demo[12], &local[12]);
    for key in ["type", "prompt_tokens", "generated_tokens", "finish_reason"] {
        assert_eq!(d[key], l[key], "{key}");
    }
    assert!(d["job_id"].as_str().unwrap().starts_with("job-"));
    for key in ["ttft_ms", "prompt_tok_s", "decode_tok_s"] {
        assert!(d[key].as_f64().unwrap() > 0.0);
    }
}

/// Pids of the processes whose parent is `parent`, with their command lines.
#[cfg(target_os = "linux")]
fn children_of(parent: u32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Some(stat) = sovra_tests::proc_stat(&pid.to_string()) else {
            continue;
        };
        if stat[1] == parent.to_string() {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            out.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    out
}

/// Running (not gone, not a zombie waiting to be reaped).
#[cfg(target_os = "linux")]
fn alive(pid: i32) -> bool {
    sovra_tests::proc_stat(&pid.to_string()).is_some_and(|stat| stat[0] != "Z")
}

#[cfg(target_os = "linux")]
#[test]
fn killing_the_demo_with_sigkill_stops_its_coordinator_and_workers() {
    use std::time::{Duration, Instant};

    sovra_tests::smollm2_path();
    // The demos of this test keep their folders in a temporary folder of their own.
    let tmp = tempfile::tempdir().unwrap();
    // Once a token streams, the coordinator and the three workers are running.
    let (mut demo, first) = sovra_tests::spawn_until_first_line(
        Command::new(env!("CARGO_BIN_EXE_sovra"))
            .env("TMPDIR", tmp.path())
            .args(["demo", "--json", "--ignore-eos", "--max-tokens", "4000"]),
    );
    assert!(first.contains("\"token\""), "{first}");
    let children = children_of(demo.id());
    let roles = |word: &str| children.iter().filter(|(_, c)| c.contains(word)).count();
    assert_eq!(
        (roles(" coordinator start"), roles(" worker start")),
        (1, 3),
        "{children:?}"
    );
    demo.kill().unwrap(); // SIGKILL: the demo cannot clean up after itself
    demo.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && children.iter().any(|(pid, _)| alive(*pid)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<_> = children.iter().filter(|(pid, _)| alive(*pid)).collect();
    for (pid, _) in &left {
        // Safety: plain kill(2) on a pid this test saw as the demo's child.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    assert!(
        left.is_empty(),
        "still running after the demo died: {left:?}"
    );

    // Its folder is left; the next demo removes it, and only it: not a kept folder (no owner
    // file) nor that of a demo that still runs (here: this test process as its owner).
    let demo_dirs = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("sovra-demo-"))
            .collect();
        names.sort();
        names
    };
    let dead = demo_dirs();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(tmp.path().join(&dead[0]).join("demo.owner").exists());
    std::fs::create_dir(tmp.path().join("sovra-demo-kept")).unwrap();
    let running = tmp.path().join("sovra-demo-running");
    std::fs::create_dir(&running).unwrap();
    let me = sovra_tests::proc_stat("self").unwrap();
    let ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    std::fs::write(
        running.join("demo.owner"),
        format!("{} {} {}\n", std::process::id(), me[19], ns.display()),
    )
    .unwrap();
    // One of another PID namespace whose pid is not running here: left alone too.
    let elsewhere = tmp.path().join("sovra-demo-elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("demo.owner"), "4194303 1 pid:[1]\n").unwrap();
    let next = Command::new(env!("CARGO_BIN_EXE_sovra"))
        .env("TMPDIR", tmp.path())
        .args(["demo", "--json", "--max-tokens", "1"])
        .output()
        .unwrap();
    assert!(
        next.status.success(),
        "{}",
        String::from_utf8_lossy(&next.stderr)
    );
    assert_eq!(
        demo_dirs(),
        [
            "sovra-demo-elsewhere",
            "sovra-demo-kept",
            "sovra-demo-running"
        ]
    );
}

#[test]
fn ctrl_c_tears_the_demo_down_and_exits_130() {
    use std::io::Read;
    sovra_tests::smollm2_path();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_sovra"))
        .args(["demo", "--keep", "--ignore-eos", "--max-tokens", "2000"])
        .arg("Write a long story about the sea.")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Some of the answer first. Its stdout stays open (a closed pipe would end it by
    // SIGPIPE, as it ends any command writing to one, before it sees the Ctrl-C).
    let mut first = [0u8; 16];
    let mut stdout = demo.stdout.take().unwrap();
    stdout.read_exact(&mut first).unwrap();
    let pid = demo.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = demo.wait_with_output().unwrap();
    drop(stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.ends_with("\ninterrupted\n"), "{stderr}");
    // Its coordinator and workers are gone (their command lines name the demo's folder).
    let dir = stderr
        .lines()
        .find_map(|l| l.strip_prefix("demo files kept in "))
        .expect("the folder")
        .to_string();
    let left = Command::new("pgrep").args(["-f", &dir]).output().unwrap();
    assert!(
        left.stdout.is_empty(),
        "still running: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
