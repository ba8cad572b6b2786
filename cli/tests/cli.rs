//! The `sovra` binary as a user runs it: JSON lines, errors, stop conditions.

use std::process::{Command, Output};

use serde_json::Value;

fn sovra(args: &[&str]) -> Output {
    // Make sure the model is in the cache before timing-insensitive runs.
    sovra_tests::smollm2_path();
    Command::new(env!("CARGO_BIN_EXE_sovra"))
        .args(args)
        .env("SOVRA_THREADS", "2")
        .output()
        .expect("running sovra")
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

const FRANCE: &str = "What is the capital of France?";

#[test]
fn json_output_streams_reference_tokens_then_a_summary() {
    let out = sovra(&[
        "generate",
        "--local",
        "-m",
        "smollm2",
        "--chat",
        "--dtype",
        "f32",
        "--ignore-eos",
        "--max-tokens",
        "10",
        "--json",
        FRANCE,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 11);
    let golden = &sovra_tests::golden_cases().unwrap()[0];
    for (i, line) in lines[..10].iter().enumerate() {
        assert_eq!(line["type"], "token");
        assert_eq!(line["index"], i);
        assert_eq!(line["token_id"], golden.generated_ids[i]);
        assert!(line["text"].is_string());
    }
    let text: String = lines[..10]
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert!(
        text.starts_with("The capital of France is Paris."),
        "{text}"
    );
    let summary = &lines[10];
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["prompt_tokens"], 16);
    assert_eq!(summary["generated_tokens"], 10);
    assert_eq!(summary["finish_reason"], "length");
    for key in ["ttft_ms", "prompt_tok_s", "decode_tok_s"] {
        assert!(summary[key].as_f64().unwrap() > 0.0, "{key}");
    }
}

#[test]
fn generation_stops_at_end_of_sequence() {
    let out = sovra(&[
        "generate", "--local", "-m", "smollm2", "--chat", "--dtype", "f32", "--json", FRANCE,
    ]);
    assert!(out.status.success());
    let lines = json_lines(&out);
    let summary = lines.last().unwrap();
    assert_eq!(summary["finish_reason"], "eos");
    // The reference reaches <|im_end|> after 7 tokens; EOS itself is not output.
    assert_eq!(summary["generated_tokens"], 7);
    let text: String = lines
        .iter()
        .filter(|l| l["type"] == "token")
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "The capital of France is Paris.");
}

#[test]
fn stop_string_cuts_the_text_before_it() {
    let out = sovra(&[
        "generate", "--local", "-m", "smollm2", "--chat", "--dtype", "f32", "--stop", " Paris",
        "--json", FRANCE,
    ]);
    assert!(out.status.success());
    let lines = json_lines(&out);
    let text: String = lines
        .iter()
        .filter(|l| l["type"] == "token")
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "The capital of France is");
    assert_eq!(lines.last().unwrap()["finish_reason"], "stop");
}

#[test]
fn plain_output_streams_text_and_stats_on_stderr() {
    let out = sovra(&[
        "generate",
        "--local",
        "-m",
        "smollm2",
        "--chat",
        "--max-tokens",
        "5",
        FRANCE,
    ]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("The capital"), "{stdout}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("tok/s") && stderr.contains("finish: length"),
        "{stderr}"
    );
}

#[test]
fn temperature_sampling_is_reproducible_and_split_invariant() {
    let args = |stages: &str| {
        sovra(&[
            "generate",
            "--local",
            "-m",
            "smollm2",
            "--chat",
            "--temperature",
            "0.8",
            "--seed",
            "11",
            "--ignore-eos",
            "--max-tokens",
            "16",
            "--stages",
            stages,
            "--json",
            "Tell me a story.",
        ])
    };
    let ids = |out: &Output| -> Vec<u64> {
        json_lines(out)
            .iter()
            .filter(|l| l["type"] == "token")
            .map(|l| l["token_id"].as_u64().unwrap())
            .collect()
    };
    let one = ids(&args("1"));
    assert_eq!(one.len(), 16);
    assert_eq!(one, ids(&args("1")));
    assert_eq!(one, ids(&args("3")));
}

#[test]
fn errors_are_one_line_or_one_json_object_with_nonzero_exit() {
    let out = sovra(&["generate", "--local", "-m", "no-such-model", "hello"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("no-such-model") && stderr.contains("smollm2"),
        "{stderr}"
    );

    let out = sovra(&["generate", "--local", "-m", "smollm2", "--json", ""]);
    assert!(!out.status.success());
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["type"], "error");
    assert!(lines[0]["message"].as_str().unwrap().contains("empty"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("empty"), "{stderr}");

    for bad in [
        ["--temperature", "NaN"],
        ["--top-p", "1.5"],
        ["--max-tokens", "0"],
        ["--stages", "31"],
    ] {
        let out = sovra(&[
            "generate", "--local", "-m", "smollm2", bad[0], bad[1], "--json", "hi",
        ]);
        assert!(!out.status.success(), "{bad:?}");
        assert_eq!(json_lines(&out)[0]["type"], "error", "{bad:?}");
    }

    // A corrupt model: one line, also with RUST_BACKTRACE set (candle errors would carry a
    // backtrace in their message).
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend([3, 0, 0, 0]);
    bytes.extend([0xff; 64]);
    std::fs::write(&corrupt, bytes).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sovra"))
        .args(["model", "inspect", "-m"])
        .arg(&corrupt)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("corrupt.gguf"), "{stderr}");

    let out = sovra(&["demo", "--stages", "4", "--json"]);
    assert!(!out.status.success());
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["type"], "error");
    assert!(lines[0]["message"].as_str().unwrap().contains("--stages"));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn an_empty_path_variable_is_refused_with_a_message_naming_it() {
    for (var, args) in [
        ("SOVRA_TOKEN_FILE", &["job", "list"][..]),
        ("SOVRA_CA", &["job", "list"][..]),
        ("SOVRA_DATA_DIR", &["coordinator", "start"][..]),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sovra"))
            .args(args)
            .env(var, "")
            .output()
            .expect("running sovra");
        assert!(!out.status.success(), "{var}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.contains("the path is empty") && stderr.contains("environment variable"),
            "{var}: {stderr}"
        );
    }
}

#[test]
fn inspect_reports_the_spec_and_slice_memory() {
    let out = sovra(&[
        "model", "inspect", "-m", "smollm2", "--layers", "0..10", "--dtype", "gguf", "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let spec = &doc["spec"];
    assert_eq!(spec["architecture"], "llama");
    assert_eq!(spec["layers"], 30);
    assert_eq!(spec["hidden_size"], 576);
    assert_eq!(spec["heads"], 9);
    assert_eq!(spec["kv_heads"], 3);
    assert_eq!(spec["head_dim"], 64);
    assert_eq!(spec["ffn_size"], 1536);
    assert_eq!(spec["vocab_size"], 49152);
    assert_eq!(spec["context_length"], 8192);
    assert_eq!(spec["tied_embeddings"], true);
    let slice = &doc["slice"];
    assert_eq!(slice["holds_embedding"], true);
    assert_eq!(slice["holds_head"], false);
    assert!(slice["tensor_bytes"].as_u64().unwrap() > 10 * 2_000_000);
}

#[cfg(target_os = "linux")]
#[test]
fn a_bad_core_list_is_refused_before_the_worker_starts() {
    let available = sovra_worker::cpus::allowed_cores().unwrap();
    let missing = (0..1024)
        .find(|c| !available.contains(c))
        .unwrap()
        .to_string();
    let worker = |extra: &[&str]| {
        let mut args = vec![
            "worker",
            "start",
            "--coordinator",
            "https://127.0.0.1:9",
            "--data-dir",
            "/nonexistent/sovra-worker",
        ];
        args.extend_from_slice(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_sovra"))
            .args(&args)
            .output()
            .expect("running sovra");
        assert!(!out.status.success(), "{extra:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    for (extra, expected) in [
        (
            vec!["--cpus", missing.as_str()],
            "not available to this process",
        ),
        (vec!["--cpus", "1-0"], "runs backwards"),
        (vec!["--cpus", "0,0"], "appears twice"),
        (vec!["--cpus", "x"], "is not a core number"),
        (
            vec!["--threads", "3", "--cpus", "0"],
            "disagrees with --cpus",
        ),
    ] {
        let stderr = worker(&extra);
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
}

#[test]
fn a_thread_count_of_zero_or_beyond_reason_is_refused() {
    for args in [
        vec![
            "--threads",
            "0",
            "generate",
            "-m",
            "smollm2",
            "--local",
            "hi",
        ],
        vec!["demo", "--worker-threads", "0"],
        vec!["demo", "--worker-threads", "18446744073709551615"],
        vec!["demo", "--worker-threads", "many"],
    ] {
        let out = sovra(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("expected a number of threads from 1 to 1024"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn a_token_on_the_command_line_wins_over_the_environment() {
    // The coordinator is never reached: a missing token file shows which token was taken.
    let run = |env: (&str, &str), extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sovra"))
            .args(["job", "list", "--coordinator", "https://127.0.0.1:9"])
            .args(["--ca", concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")])
            .args(extra)
            .env_remove("SOVRA_TOKEN")
            .env_remove("SOVRA_TOKEN_FILE")
            .env(env.0, env.1)
            .output()
            .expect("running sovra");
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let missing = "/nonexistent/sovra-token";
    let file_flag = run(("SOVRA_TOKEN", "t"), &["--token-file", missing]);
    assert!(
        file_flag.contains("reading /nonexistent/sovra-token"),
        "{file_flag}"
    );
    let token_flag = run(("SOVRA_TOKEN_FILE", missing), &["--token", "t"]);
    assert!(!token_flag.contains("reading"), "{token_flag}");
    let empty = run(("SOVRA_TOKEN", " "), &[]);
    assert!(empty.contains("the token is empty"), "{empty}");
}

#[test]
fn sampling_values_out_of_range_are_refused_before_anything_runs() {
    let long_stop = "x".repeat(300);
    for (flag, value, expected) in [
        ("--stop", "", "stop string 1 is empty"),
        (
            "--stop",
            long_stop.as_str(),
            "stop string 1 is 300 bytes long; at most 256",
        ),
        (
            "--temperature",
            "-1",
            "temperature must be a finite number >= 0",
        ),
        (
            "--temperature",
            "nan",
            "temperature must be a finite number >= 0",
        ),
        ("--top-p", "0", "top-p must be in (0, 1]"),
        ("--top-p", "-0.5", "top-p must be in (0, 1]"),
        ("--top-p", "5", "top-p must be in (0, 1]"),
        ("--top-k", "0", "top-k must be at least 1"),
        ("--top-k", "-3", "top-k must be at least 1"),
        (
            "--max-tokens",
            "0",
            "max tokens must be between 1 and 1048576",
        ),
        (
            "--max-tokens",
            "-1",
            "max tokens must be between 1 and 1048576",
        ),
        (
            "--max-tokens",
            "2000000",
            "max tokens must be between 1 and 1048576",
        ),
    ] {
        // `run` is refused before it dials the coordinator (none listens on port 9).
        let remote = [
            "run",
            "-m",
            "smollm2",
            "--coordinator",
            "https://127.0.0.1:9",
        ];
        let remote = [&remote[..], &["--ca", "/nonexistent/ca.pem"]].concat();
        for command in [&remote[..], &["generate", "-m", "smollm2", "--local"]] {
            let mut args = command.to_vec();
            args.extend([flag, value, "hi"]);
            let out = sovra(&args);
            assert!(!out.status.success(), "{args:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
            assert!(stderr.contains(expected), "{args:?}: {stderr}");
            args.push("--json");
            let out = sovra(&args);
            let lines = json_lines(&out);
            assert_eq!(lines.len(), 1, "{args:?}");
            assert_eq!(lines[0]["type"], "error", "{args:?}");
            let message = lines[0]["message"].as_str().unwrap();
            assert!(message.contains(expected), "{args:?}: {message}");
        }
    }
}

#[test]
fn a_start_that_fails_leaves_no_folder_or_authority_behind() {
    let root = tempfile::tempdir().unwrap();
    // A worker whose join fails leaves no data dir it created; one that existed stays.
    let fresh = root.path().join("fresh").join("worker");
    let kept = root.path().join("kept-worker");
    std::fs::create_dir(&kept).unwrap();
    for dir in [&fresh, &kept] {
        let out = Command::new(env!("CARGO_BIN_EXE_sovra"))
            .args(["worker", "start", "--coordinator", "https://127.0.0.1:9"])
            .args(["--join-token", "not-a-token", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("token"), "{stderr}");
    }
    assert!(
        !root.path().join("fresh").exists(),
        "the failed join left {}",
        fresh.display()
    );
    assert!(kept.is_dir());

    // A coordinator that cannot take its port creates no CA and no operator token.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let data = root.path().join("coordinator");
    let out = Command::new(env!("CARGO_BIN_EXE_sovra"))
        .args(["coordinator", "start", "--listen", &port, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&port), "{stderr}");
    assert!(!data.join("ca.pem").exists() && !data.join("admin.token").exists());
}

#[test]
fn numbers_too_large_are_refused_not_wrapped() {
    let fail = |args: &[&str], expect: &str| {
        let out = sovra(args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    };
    fail(
        &[
            "bench",
            "-m",
            "smollm2",
            "--prompt-tokens",
            "18446744073709551615",
            "--tokens",
            "1",
        ],
        "exceed the context",
    );
    fail(
        &["bench", "-m", "smollm2", "--batch", "100000000000"],
        "--batch",
    );
    // Refused before any coordinator is asked (none runs at this address).
    for layers in ["w=4294967296..4294967298", "w=0..4294967297"] {
        fail(
            &[
                "placement",
                "set",
                "smollm2",
                "--layers",
                layers,
                "--coordinator",
                "https://127.0.0.1:9",
                "--token",
                "x",
            ],
            "out of range",
        );
    }
}

#[test]
fn a_coordinator_that_does_not_answer_is_given_up_on_with_a_message() {
    // Accepts TCP connections (the kernel does, into the backlog) and never answers: as a
    // coordinator that hangs.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", silent.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let ca = sovra_proto::ca::FederationCa::generate("test").unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_sovra"))
        .args(["job", "list", "--coordinator", &url, "--token", "x", "--ca"])
        .arg(&ca_path)
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no answer within 10 s"), "{stderr}");
    assert!(took < std::time::Duration::from_secs(30), "{took:?}");
    drop(silent);
}

#[test]
fn more_threads_than_cores_are_refused() {
    let cores = std::thread::available_parallelism().unwrap().get();
    let more = (cores + 1).to_string();
    for args in [
        vec![
            "--threads",
            &more,
            "generate",
            "-m",
            "smollm2",
            "--local",
            "hi",
        ],
        vec!["demo", "--worker-threads", &more],
    ] {
        let out = sovra(&args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{more} is more than the {cores} cores")),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn a_lost_operator_token_is_named_at_start_and_reset_offline() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("coordinator");
    let start = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sovra"))
            .args([
                "coordinator",
                "start",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(&data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut url = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut url)
            .unwrap();
        (child, url.trim().to_string())
    };
    let stop = |child: std::process::Child| -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let providers = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_sovra"))
            .args(["provider", "list", "--coordinator", url, "--ca"])
            .arg(data.join("ca.pem"))
            .arg("--token-file")
            .arg(data.join("admin.token"))
            .output()
            .unwrap()
    };
    let (first, _) = start();
    let old = std::fs::read_to_string(data.join("admin.token")).unwrap();
    // Not while it runs (its database is in use).
    let busy = sovra(&[
        "coordinator",
        "reset-token",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("stop it first"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    stop(first);
    std::fs::write(data.join("admin.token"), "").unwrap();
    let (second, url) = start();
    assert!(!providers(&url).status.success(), "an empty token file");
    let said = stop(second);
    assert!(
        said.contains("does not hold the operator token") && said.contains("reset-token"),
        "{said}"
    );
    let reset = sovra(&[
        "coordinator",
        "reset-token",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(
        reset.status.success(),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    let new = std::fs::read_to_string(data.join("admin.token")).unwrap();
    assert!(new.trim().starts_with("sovra-op-") && new != old, "{new}");
    let (third, url) = start();
    let listed = providers(&url);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let said = stop(third);
    assert!(!said.contains("does not hold"), "{said}");
    // A folder that holds no coordinator is refused, not made into one.
    let empty = dir.path().join("nothing");
    let refused = sovra(&[
        "coordinator",
        "reset-token",
        "--data-dir",
        empty.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    assert!(!empty.exists());
    // Nor one with only a CA certificate, as a worker's data dir has.
    let worker_like = dir.path().join("worker");
    std::fs::create_dir(&worker_like).unwrap();
    std::fs::copy(data.join("ca.pem"), worker_like.join("ca.pem")).unwrap();
    let refused = sovra(&[
        "coordinator",
        "reset-token",
        "--data-dir",
        worker_like.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("holds no coordinator"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!worker_like.join("db").exists());
}

#[cfg(unix)]
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    sovra_tests::smollm2_path();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sovra"))
        .args([
            "generate",
            "--local",
            "-m",
            "smollm2",
            "--ignore-eos",
            "--max-tokens",
            "200",
            "hi",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read a little, then close the pipe (as `| head -c 1` does).
    let mut first = [0u8; 1];
    let mut stdout = child.stdout.take().unwrap();
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{stderr}");
}
