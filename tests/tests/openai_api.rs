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

/// One HTTPS request to `addr` (HTTP/1.1, the coordinator's CA trusted); returns the status and
/// the whole body.
async fn https(
    fed: &TestFederation,
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, String) {
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
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS with the federation's CA");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr)
        .header("content-type", "application/json");
    if let Some(t) = token {
        request = request.header("authorization", format!("Bearer {t}"));
    }
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let response = sender
        .send_request(request.body(Full::new(body)).unwrap())
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
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        finish
    );
    // More text chunks than one: the answer streamed as it was generated.
    assert!(chunks.len() > 3, "{chunks:?}");

    // A conversation with an assistant turn runs too; the jobs are listed like any other.
    let (status, body) = api
        .chat(
            &tenant,
            json!({
                "model": "smollm2",
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Name a colour."},
                ],
                "max_completion_tokens": 4,
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let listed = pb::jobs_client::JobsClient::new(fed.channel(Some(&tenant)).await)
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 4);
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
        (
            Some(tenant.as_str()),
            "/v1/completions",
            Some(chat("smollm2")),
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
    let (status, got) = api.chat(&tenant, huge).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{got}");
    assert!(
        error_of(&got).1.contains("reading the request body"),
        "{got}"
    );

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
