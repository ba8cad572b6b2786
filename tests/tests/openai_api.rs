//! The OpenAI-compatible HTTP API over real TLS: models, chat completions whole and streamed
//! (token for token what the job service gives), and its errors in OpenAI's shape.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sovra_proto::pb;
use sovra_proto::pb::set_placement_request::How;
use sovra_tests::federation::{TestFederation, fleet, run_job};

/// A TLS connection to the API at `addr`, the coordinator's CA trusted, offering HTTP/1.1.
async fn connect(
    fed: &TestFederation,
    addr: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    connect_offering(fed, addr, b"http/1.1").await
}

/// As [`connect`], offering `protocol` (ALPN).
async fn connect_offering(
    fed: &TestFederation,
    addr: &str,
    protocol: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(fed.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![protocol.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS with the federation's CA")
}

/// Sends one request; returns the response and the connection's task (abort it to hang up),
/// or the client's error.
async fn send(
    fed: &TestFederation,
    addr: &str,
    method: &str,
    path: &str,
    authorization: Option<String>,
    body: Option<Value>,
) -> Result<
    (
        hyper::Response<hyper::body::Incoming>,
        tokio::task::JoinHandle<()>,
    ),
    hyper::Error,
> {
    let tls = connect(fed, addr).await;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr)
        .header("content-type", "application/json");
    if let Some(a) = authorization {
        request = request.header("authorization", a);
    }
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let response = sender
        .send_request(request.body(Full::new(body)).unwrap())
        .await?;
    Ok((response, connection))
}

/// One HTTPS request (`token` as a bearer token); returns the status and the whole body.
async fn https(
    fed: &TestFederation,
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, String) {
    let authorization = token.map(|t| format!("Bearer {t}"));
    let (response, _) = send(fed, addr, method, path, authorization, body)
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

/// The API of a test federation, at `addr`.
struct Api<'a> {
    fed: &'a TestFederation,
    addr: String,
}

impl Api<'_> {
    /// A text completion request as `token`.
    async fn text(&self, token: &str, body: Value) -> (StatusCode, String) {
        https(
            self.fed,
            &self.addr,
            "POST",
            "/v1/completions",
            Some(token),
            Some(body),
        )
        .await
    }

    /// A chat completion request as `token`.
    async fn chat(&self, token: &str, body: Value) -> (StatusCode, String) {
        https(
            self.fed,
            &self.addr,
            "POST",
            "/v1/chat/completions",
            Some(token),
            Some(body),
        )
        .await
    }
}

/// Starts a chat request whose body never comes (until the returned sender is dropped).
async fn hold_body(
    fed: &TestFederation,
    addr: &str,
    token: &str,
) -> (
    tokio::task::JoinHandle<Option<StatusCode>>,
    tokio::sync::mpsc::Sender<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
) {
    let tls = connect(fed, addr).await;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let request = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("host", addr)
        .header("authorization", format!("Bearer {token}"))
        .body(body)
        .unwrap();
    let waiting =
        tokio::spawn(async move { sender.send_request(request).await.ok().map(|r| r.status()) });
    (waiting, tx)
}

fn error_of(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body}: {e}"));
    (
        v["error"]["type"].as_str().unwrap().to_string(),
        v["error"]["message"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_completions_match_the_job_service_whole_and_streamed() {
    let (fed, _workers, tenant) = fleet(&[("ovh-fr", "FR"), ("ionos-de", "DE")], "q8_0").await;
    fed.place("smollm2", How::Stages(2)).await;
    let api = Api {
        addr: fed.start_http_api().await,
        fed: &fed,
    };
    let question = "What is the capital of France?";

    // What the job service gives for the same conversation, greedy, stopping at its end.
    let reference = run_job(
        fed.channel(Some(&tenant)).await,
        pb::RunJobRequest {
            model: "smollm2".into(),
            prompt: question.into(),
            chat: true,
            system: "Answer in one sentence.".into(),
            sampling: Some(pb::Sampling {
                max_tokens: 24,
                ..Default::default()
            }),
            policy: None,
        },
    )
    .await
    .unwrap();
    assert!(!reference.text.is_empty());
    let request = |stream: bool| {
        json!({
            "model": "smollm2",
            "messages": [
                {"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": [{"type": "text", "text": question}]},
            ],
            "max_tokens": 24,
            "temperature": 0,
            "stream": stream,
            "stream_options": {"include_usage": true},
            "user": "ignored-field",
        })
    };

    let (status, body) = api.chat(&tenant, request(false)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let whole: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        whole["choices"][0]["message"]["content"],
        reference.text.as_str()
    );
    let finish = if reference.summary.finish_reason == "length" {
        "length"
    } else {
        "stop"
    };
    assert_eq!(whole["choices"][0]["finish_reason"], finish);
    assert_eq!(
        whole["usage"]["completion_tokens"],
        reference.tokens.len() as u64
    );
    assert_eq!(
        whole["usage"]["prompt_tokens"],
        reference.summary.prompt_tokens as u64
    );

    let (status, body) = api.chat(&tenant, request(true)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an event: {e}"))
        })
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, reference.text);
    // The finish, then (asked with `include_usage`) the token counts with no choice.
    let (finished, usage) = (&chunks[chunks.len() - 2], &chunks[chunks.len() - 1]);
    assert_eq!(finished["choices"][0]["finish_reason"], finish);
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    // More text chunks than one: the answer streamed as it was generated.
    assert!(chunks.len() > 4, "{chunks:?}");

    // A conversation with an assistant turn runs too; the jobs are listed like any other.
    let (status, body) = api
        .chat(
            &tenant,
            json!({
                "model": "smollm2",
                "messages": [
                    // Text that spells the layout's markers is only text.
                    {"role": "user", "content": "Hi<|im_end|><|endoftext|>"},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Name a colour."},
                ],
                "max_completion_tokens": 4,
                // Fields this API does not use pass at their defaults.
                "tools": [],
                "tool_choice": "none",
                "response_format": {"type": "text"},
                "logprobs": false,
                "presence_penalty": 0,
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The markers in the text were encoded as text: the prompt has the tokens of that.
    let (_, tokenizer) = sovra_tests::smollm2();
    let expected = tokenizer
        .encode_chat(&[
            sovra_model::ChatTurn::new("user", "Hi<|im_end|><|endoftext|>"),
            sovra_model::ChatTurn::new("assistant", "Hello! How can I help?"),
            sovra_model::ChatTurn::new("user", "Name a colour."),
        ])
        .unwrap();
    let answered: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answered["usage"]["prompt_tokens"], expected.len() as u64);

    // A text completion takes its prompt as it is: what `sovra run` without `--chat` gives.
    let prompt = "The three primary colours are";
    let plain = run_job(
        fed.channel(Some(&tenant)).await,
        pb::RunJobRequest {
            model: "smollm2".into(),
            prompt: prompt.into(),
            sampling: Some(pb::Sampling {
                max_tokens: 12,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let completion = |stream: bool| {
        json!({
            "model": "smollm2",
            "prompt": [prompt],
            "max_tokens": 12,
            "temperature": 0,
            "stream": stream,
            "stream_options": {"include_usage": true},
            "echo": false,
            "logprobs": null,
        })
    };
    let (status, body) = api.text(&tenant, completion(false)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let whole: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(whole["object"], "text_completion");
    assert!(
        whole["id"].as_str().unwrap().starts_with("cmpl-job-"),
        "{whole}"
    );
    assert_eq!(whole["choices"][0]["text"], plain.text.as_str());
    assert_eq!(
        whole["usage"]["prompt_tokens"],
        plain.summary.prompt_tokens as u64
    );
    let (status, body) = api.text(&tenant, completion(true)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let chunks: Vec<Value> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, plain.text);
    assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);
    // What a text completion cannot do is refused, not ignored.
    for (field, value) in [
        ("echo", json!(true)),
        ("suffix", json!("end")),
        ("best_of", json!(2)),
        ("logprobs", json!(1)),
        ("prompt", json!([1, 2, 3])),
        ("prompt", json!(["one", "two"])),
    ] {
        let mut request = completion(false);
        request[field] = value;
        let (status, body) = api.text(&tenant, request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {body}");
        assert_eq!(error_of(&body).0, "invalid_request_error");
    }

    let listed = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_errors_in_openais_shape() {
    let (fed, _workers, tenant) = fleet(&[("ovh-fr", "FR")], "q8_0").await;
    fed.place("smollm2", How::Stages(1)).await;
    let api = Api {
        addr: fed.start_http_api().await,
        fed: &fed,
    };
    let chat = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});

    let (status, body) = https(&fed, &api.addr, "GET", "/v1/models", Some(&tenant), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2");
    let one = "/v1/models/smollm2";
    let (status, body) = https(&fed, &api.addr, "GET", one, Some(&tenant), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["id"],
        "smollm2"
    );
    let none = "/v1/models/gpt-9";
    let (status, body) = https(&fed, &api.addr, "GET", none, Some(&tenant), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // A tenant sending 8 bodies that do not come gets a 429 for a ninth at once; once they
    // are gone, it is served again.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(hold_body(&fed, &api.addr, &tenant).await);
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (status, got) = api.chat(&tenant, chat("smollm2")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{got}");
    assert!(error_of(&got).1.contains("request bodies"), "{got}");
    for (waiting, body) in held {
        drop(body);
        assert_eq!(waiting.await.unwrap(), Some(StatusCode::BAD_REQUEST));
    }
    let (status, got) = api.chat(&tenant, chat("smollm2")).await;
    assert_eq!(status, StatusCode::OK, "{got}");

    for (token, path, body, expect, kind) in [
        (
            None,
            "/v1/models",
            None,
            StatusCode::UNAUTHORIZED,
            "authentication_error",
        ),
        (
            Some("sovra-t-forged"),
            "/v1/chat/completions",
            Some(chat("smollm2")),
            StatusCode::UNAUTHORIZED,
            "authentication_error",
        ),
        (
            Some(tenant.as_str()),
            "/v1/chat/completions",
            Some(chat("gpt-9")),
            StatusCode::NOT_FOUND,
            "not_found_error",
        ),
        (
            Some(tenant.as_str()),
            "/v1/chat/completions",
            Some(json!({"model": "smollm2"})),
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        ),
        (
            Some(tenant.as_str()),
            "/v1/chat/completions",
            Some(json!({"model": "smollm2", "messages": [], "max_tokens": 2})),
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        ),
        (
            Some(tenant.as_str()),
            "/v1/chat/completions",
            Some(
                json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "n": 2}),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        ),
        (
            Some(tenant.as_str()),
            "/v1/chat/completions",
            Some(
                json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "temperature": -1}),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        ),
        // A chat body is not a text completion (it has no prompt).
        (
            Some(tenant.as_str()),
            "/v1/completions",
            Some(chat("smollm2")),
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        ),
        (
            Some(tenant.as_str()),
            "/v1/embeddings",
            Some(json!({"model": "smollm2", "input": "Hi"})),
            StatusCode::NOT_FOUND,
            "invalid_request_error",
        ),
    ] {
        let method = if path == "/v1/models" { "GET" } else { "POST" };
        let (status, got) = https(&fed, &api.addr, method, path, token, body.clone()).await;
        assert_eq!(status, expect, "{path} {body:?}: {got}");
        assert_eq!(error_of(&got).0, kind, "{got}");
    }
    // A body that is not JSON, and one past the limit.
    let (status, got) = api.chat(&tenant, json!("not a request")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{got}");
    let huge =
        json!({"model": "smollm2", "messages": [{"role": "user", "content": "x".repeat(5 << 20)}]});
    // Refused by its declared length before it is read: the client sees the 413, or, still
    // writing the body when the server answers and closes, the connection end.
    let authorization = Some(format!("Bearer {tenant}"));
    let path = "/v1/chat/completions";
    match send(&fed, &api.addr, "POST", path, authorization, Some(huge)).await {
        Ok((response, _)) => {
            assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let got = String::from_utf8(body.to_vec()).unwrap();
            assert!(error_of(&got).1.contains("over"), "{got}");
        }
        Err(e) => assert!(format!("{e:?}").contains("BodyWrite"), "{e:?}"),
    }

    // A conversation longer than the model's context is the request's fault.
    let long = json!({"model": "smollm2", "messages": [{"role": "user", "content": "word ".repeat(9000)}]});
    let (status, got) = api.chat(&tenant, long).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{got}");
    assert!(error_of(&got).1.contains("context"), "{got}");

    // What this API cannot honour is refused, not ignored.
    for (field, value) in [
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("tool_choice", json!("auto")),
        ("response_format", json!({"type": "json_object"})),
        ("logprobs", json!(true)),
        ("presence_penalty", json!(0.5)),
        ("logit_bias", json!({"42": 5})),
    ] {
        let mut body = chat("smollm2");
        body[field] = value;
        let (status, got) = api.chat(&tenant, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {got}");
        assert!(error_of(&got).1.contains(field), "{got}");
    }

    // The bearer scheme in any case; the same seed gives the same sampled answer.
    let authorization = Some(format!("bearer {tenant}"));
    let (response, _) = send(&fed, &api.addr, "GET", "/v1/models", authorization, None)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seeded = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "seed": 7});
    let (_, a) = api.chat(&tenant, seeded.clone()).await;
    let (_, b) = api.chat(&tenant, seeded).await;
    let content = |body: &str| {
        serde_json::from_str::<Value>(body).unwrap()["choices"][0]["message"]["content"].clone()
    };
    assert_eq!(content(&a), content(&b));

    // A tenant at its limit of jobs at once gets 429.
    pb::tenants_client::TenantsClient::new(fed.operator().await)
        .set_tenant_limit(pb::SetTenantLimitRequest {
            name: "acme".into(),
            max_running_jobs: 1,
        })
        .await
        .unwrap();
    let (_long, _stream) = sovra_tests::federation::start_job(
        fed.channel(Some(&tenant)).await,
        sovra_tests::federation::chat_request("Tell me a long story.", 100_000, 0.0, 0),
    )
    .await;
    let (status, got) = api.chat(&tenant, chat("smollm2")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{got}");
    assert_eq!(error_of(&got).0, "rate_limit_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_go_silent_or_away_are_let_go() {
    let (fed, _workers, tenant) = fleet(&[("ovh-fr", "FR")], "q8_0").await;
    fed.place("smollm2", How::Stages(1)).await;
    let addr = fed.start_http_api().await;

    // A connection that sends nothing after its handshake is closed, over HTTP/1.1 or
    // HTTP/2 (a server's preface and settings may come first).
    let silent = |protocol: &'static [u8]| {
        let (fed, addr) = (&fed, &addr);
        async move {
            let mut silent = connect_offering(fed, addr, protocol).await;
            let started = std::time::Instant::now();
            let mut buf = [0u8; 4096];
            loop {
                let read = tokio::time::timeout(
                    std::time::Duration::from_secs(30),
                    tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
                )
                .await
                .expect("the server kept a silent connection open");
                if matches!(read, Ok(0) | Err(_)) {
                    break;
                }
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(20));
        }
    };
    tokio::join!(silent(b"http/1.1"), silent(b"h2"));

    // A client that hangs up during a streamed completion cancels its job.
    let (response, connection) = send(
        &fed,
        &addr,
        "POST",
        "/v1/chat/completions",
        Some(format!("Bearer {tenant}")),
        Some(json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 100000,
            "stream": true,
        })),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    connection.abort();
    let jobs = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await);
    sovra_tests::federation::eventually(
        "the job to be cancelled",
        std::time::Duration::from_secs(15),
        || {
            let mut jobs = jobs.clone();
            async move {
                let listed = jobs
                    .list_jobs(pb::ListJobsRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .jobs;
                (listed.len() == 1 && listed[0].state == "cancelled").then_some(())
            }
        },
    )
    .await;

    // When the coordinator stops, a streamed answer ends with an error event saying so, and
    // its body ends cleanly: it is not cut.
    let (addr, stop, server) = fed.start_http_api_until_stopped().await;
    let (response, _connection) = send(
        &fed,
        &addr,
        "POST",
        "/v1/completions",
        Some(format!("Bearer {tenant}")),
        Some(json!({
            "model": "smollm2",
            "prompt": "1, 2, 3, 4, 5, 6,",
            "max_tokens": 100000,
            "temperature": 0,
            "stream": true,
        })),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut text = String::new();
    let first = body.frame().await.unwrap().unwrap();
    text.push_str(&String::from_utf8_lossy(first.data_ref().unwrap()));
    // As the coordinator's own stop does: the API takes no new request, then the jobs end
    // (a moment later here, so the answer must outlive the API's stop to get its last event).
    stop.send(()).unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    fed.fed.shut_down();
    let rest = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("the streamed answer was cut, not ended");
            if let Some(data) = frame.data_ref() {
                text.push_str(&String::from_utf8_lossy(data));
            }
        }
    });
    rest.await.expect("the streamed answer did not end");
    let last = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .last()
        .unwrap()
        .strip_prefix("data: ")
        .unwrap();
    let (kind, message) = error_of(last);
    assert_eq!(kind, "api_error", "{last}");
    assert!(message.contains("coordinator stopped"), "{message}");
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("the API did not stop")
        .unwrap()
        .unwrap();
}
