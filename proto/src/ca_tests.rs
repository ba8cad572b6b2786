//! Tests for the federation CA, including real TLS handshakes on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::PublicKeyData;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use x509_parser::extensions::GeneralName;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(10);

fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

fn key(pem: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn roots(ca: &FederationCa) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.cert_der())).unwrap();
    Arc::new(roots)
}

/// A worker certificate (leaf PEM) and its key, signed by `ca`.
fn worker(ca: &FederationCa, id: &str, provider: &str) -> (String, String) {
    let (key_pem, csr_pem) = generate_worker_key_and_csr(id).unwrap();
    let cert_pem = ca
        .sign_worker_csr(&csr_pem, id, provider, &names(&["127.0.0.1"]), 30)
        .unwrap();
    (cert_pem, key_pem)
}

fn plain_server(chain_pem: &str, key_pem: &str) -> ServerConfig {
    ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs(chain_pem), key(key_pem))
        .unwrap()
}

fn mtls_server(ca: &FederationCa, chain_pem: &str, key_pem: &str) -> ServerConfig {
    let verifier = WebPkiClientVerifier::builder(roots(ca)).build().unwrap();
    ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(chain_pem), key(key_pem))
        .unwrap()
}

fn mtls_client(ca: &FederationCa, cert_pem: &str, key_pem: &str) -> ClientConfig {
    ClientConfig::builder()
        .with_root_certificates(roots(ca))
        .with_client_auth_cert(certs(cert_pem), key(key_pem))
        .unwrap()
}

type Served = JoinHandle<std::io::Result<Vec<CertificateDer<'static>>>>;

/// Accepts one TLS connection; yields the client's certificates.
async fn serve_once(config: ServerConfig) -> (SocketAddr, Served) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let handle = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .to_vec();
        tls.write_all(b"ok").await?;
        tls.shutdown().await?;
        Ok(peer)
    });
    (addr, handle)
}

/// Connects as a client; returns what the server sent (or the error).
async fn client_exchange(
    config: ClientConfig,
    addr: SocketAddr,
    sni: &str,
) -> std::io::Result<Vec<u8>> {
    let connector = TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let sni = ServerName::try_from(sni.to_owned()).unwrap();
    let mut tls = connector.connect(sni, tcp).await?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await?;
    Ok(buf)
}

async fn coordinator(ca: &FederationCa) -> SocketAddr {
    let (chain, key) = ca
        .issue_server_cert(&names(&["localhost", "127.0.0.1"]))
        .unwrap();
    serve_once(plain_server(&chain, &key)).await.0
}

fn parse(pem: &str) -> Vec<u8> {
    certs(pem).remove(0).to_vec()
}

#[test]
fn generate_from_pem_round_trip_keeps_fingerprint() {
    let ca = FederationCa::generate("eu-west").unwrap();
    let fp = ca.fingerprint();
    assert_eq!(fp.len(), 64);
    assert!(
        fp.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    );
    assert_eq!(fp, fingerprint_der(&ca.cert_der()));
    let reloaded = FederationCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
    assert_eq!(reloaded.fingerprint(), fp);
    assert_eq!(reloaded.cert_pem(), ca.cert_pem());
    assert_eq!(reloaded.cert_der(), ca.cert_der());
    assert!(!format!("{ca:?}").contains("PRIVATE"));

    let der = ca.cert_der();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(cn, "sovra federation CA eu-west");
    assert!(cert.basic_constraints().unwrap().unwrap().value.ca);
    let years = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
        / (365 * 86_400);
    assert_eq!(years, 10);
}

#[test]
fn from_pem_refuses_bad_input() {
    let ca = FederationCa::generate("a").unwrap();
    let other = FederationCa::generate("b").unwrap();
    assert!(matches!(
        FederationCa::from_pem(ca.cert_pem(), other.key_pem()),
        Err(CaError::CaKeyMismatch)
    ));
    assert!(matches!(
        FederationCa::from_pem("garbage", ca.key_pem()),
        Err(CaError::InvalidCaCertificate(_))
    ));
    assert!(matches!(
        FederationCa::from_pem(ca.cert_pem(), "garbage"),
        Err(CaError::InvalidCaKey(_))
    ));
    // A leaf certificate is not a CA.
    let (chain, key) = ca.issue_server_cert(&names(&["localhost"])).unwrap();
    assert!(matches!(
        FederationCa::from_pem(&chain, &key),
        Err(CaError::InvalidCaCertificate(_))
    ));
    assert!(matches!(
        FederationCa::generate(" "),
        Err(CaError::InvalidArgument(_))
    ));
}

#[test]
fn der_to_pem_round_trips() {
    for len in 0..10 {
        let data: Vec<u8> = (0..len * 37).map(|i| (i * 7 + len) as u8).collect();
        let pem = der_to_pem("CERTIFICATE", &data);
        let back = CertificateDer::from_pem_slice(pem.as_bytes());
        if data.is_empty() {
            continue;
        }
        assert_eq!(back.unwrap().to_vec(), data);
        assert!(pem.lines().all(|l| l.len() <= 64));
    }
}

#[test]
fn fingerprint_forms_are_normalized() {
    let hex = "ab".repeat(32);
    assert_eq!(normalize_fingerprint(&hex).unwrap(), hex);
    let prefixed = format!("sha256:{}", hex.to_uppercase());
    assert_eq!(normalize_fingerprint(&prefixed).unwrap(), hex);
    let colons = vec!["AB"; 32].join(":");
    assert_eq!(normalize_fingerprint(&colons).unwrap(), hex);
    assert!(normalize_fingerprint("abc").is_err());
    assert!(normalize_fingerprint(&"zz".repeat(32)).is_err());
}

#[tokio::test]
async fn discover_ca_with_right_fingerprint_returns_ca_pem() {
    install_provider();
    let ca = FederationCa::generate("eu").unwrap();
    let addr = coordinator(&ca).await;
    let pem = discover_ca(&addr.to_string(), "localhost", &ca.fingerprint(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(pem, ca.cert_pem());

    // IP SNI, kubeadm-style "sha256:" prefix.
    let addr = coordinator(&ca).await;
    let token_hash = format!("sha256:{}", ca.fingerprint());
    let pem = discover_ca(&addr.to_string(), "127.0.0.1", &token_hash, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(pem, ca.cert_pem());
}

#[tokio::test]
async fn discover_ca_with_reloaded_ca_still_works() {
    install_provider();
    let ca = FederationCa::generate("eu").unwrap();
    let reloaded = FederationCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
    let addr = coordinator(&reloaded).await;
    let pem = discover_ca(&addr.to_string(), "localhost", &ca.fingerprint(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(pem, ca.cert_pem());
}

#[tokio::test]
async fn discover_ca_with_wrong_fingerprint_fails() {
    install_provider();
    let ca = FederationCa::generate("eu").unwrap();
    let addr = coordinator(&ca).await;
    let wrong = "00".repeat(32);
    let err = discover_ca(&addr.to_string(), "localhost", &wrong, TIMEOUT)
        .await
        .unwrap_err();
    match &err {
        CaError::FingerprintMismatch {
            expected, found, ..
        } => {
            assert_eq!(expected, &wrong);
            assert_eq!(found, &ca.fingerprint());
        }
        other => panic!("expected FingerprintMismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("not issued by this coordinator"));
}

#[tokio::test]
async fn discover_ca_refuses_server_from_another_ca() {
    install_provider();
    let ca = FederationCa::generate("ours").unwrap();
    let evil = FederationCa::generate("theirs").unwrap();
    let (chain, key) = evil.issue_server_cert(&names(&["localhost"])).unwrap();
    let addr = serve_once(plain_server(&chain, &key)).await.0;
    let err = discover_ca(&addr.to_string(), "localhost", &ca.fingerprint(), TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CaError::FingerprintMismatch { .. }),
        "{err:?}"
    );

    // The attacker appends OUR (public) CA certificate to its chain: the
    // fingerprint matches, but the leaf does not verify against it.
    let leaf_only: String = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap()
        .into();
    let forged = format!("{leaf_only}{}", ca.cert_pem());
    let addr = serve_once(plain_server(&forged, &key)).await.0;
    let err = discover_ca(&addr.to_string(), "localhost", &ca.fingerprint(), TIMEOUT)
        .await
        .unwrap_err();
    match &err {
        CaError::Tls { message, .. } => assert!(message.contains("does not verify"), "{message}"),
        other => panic!("expected Tls, got {other:?}"),
    }
}

#[tokio::test]
async fn discover_ca_checks_server_name_and_refuses_worker_certs() {
    install_provider();
    let ca = FederationCa::generate("eu").unwrap();
    let addr = coordinator(&ca).await;
    let err = discover_ca(
        &addr.to_string(),
        "coord.example.eu",
        &ca.fingerprint(),
        TIMEOUT,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, CaError::Tls { .. }), "{err:?}");

    // A worker (same CA, valid for 127.0.0.1) must not pass as the coordinator.
    let (cert, key) = worker(&ca, "w-1", "acme");
    let chain = format!("{cert}{}", ca.cert_pem());
    let addr = serve_once(plain_server(&chain, &key)).await.0;
    let err = discover_ca(&addr.to_string(), "127.0.0.1", &ca.fingerprint(), TIMEOUT)
        .await
        .unwrap_err();
    match &err {
        CaError::Tls { message, .. } => assert!(message.contains("worker certificate")),
        other => panic!("expected Tls, got {other:?}"),
    }
}

#[tokio::test]
async fn discover_ca_reports_connect_timeout_and_bad_arguments() {
    install_provider();
    let fp = "ab".repeat(32);
    // Nobody listens on a port we just released.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let err = discover_ca(&addr, "localhost", &fp, TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::Connect { .. }), "{err:?}");

    // A server that accepts TCP but never speaks TLS.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let short = Duration::from_millis(300);
    let err = discover_ca(&addr, "localhost", &fp, short)
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::Timeout { .. }), "{err:?}");

    let err = discover_ca(&addr, "localhost", "nope", TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::InvalidFingerprint(_)), "{err:?}");
    let err = discover_ca(&addr, "not a name", &fp, TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::InvalidName { .. }), "{err:?}");
}

/// The worker SANs of `sign_worker_csr_ignores_csr_subject_and_sans`.
fn assert_worker_sans(cert: &x509_parser::certificate::X509Certificate<'_>) {
    let sans = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    let rendered: Vec<String> = sans.iter().map(|n| format!("{n:?}")).collect();
    assert!(
        !rendered.iter().any(|s| s.contains("coordinator")),
        "{rendered:?}"
    );
    assert!(sans.contains(&GeneralName::DNSName("w-1")));
    assert!(sans.contains(&GeneralName::DNSName("w1.acme.example")));
    assert!(sans.contains(&GeneralName::IPAddress(&[10, 0, 0, 5])));
    assert!(sans.contains(&GeneralName::URI("sovra://worker/w-1")));
    assert_eq!(
        sans.len(),
        4,
        "duplicate worker id SAN must be dropped: {rendered:?}"
    );
}

#[test]
fn sign_worker_csr_ignores_csr_subject_and_sans() {
    let ca = FederationCa::generate("eu").unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(names(&["coordinator"])).unwrap();
    params.distinguished_name = distinguished_name(&[(DnType::CommonName, "evil")]);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr_pem = params.serialize_request(&key).unwrap().pem().unwrap();

    let addresses = names(&["10.0.0.5", "w1.acme.example", "w-1"]);
    let pem = ca
        .sign_worker_csr(&csr_pem, "w-1", "acme-dc", &addresses, 90)
        .unwrap();
    let der = parse(&pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let subject = cert.subject();
    let first = |mut it: Box<dyn Iterator<Item = &AttributeTypeAndValue<'_>> + '_>| {
        it.next().unwrap().as_str().unwrap().to_owned()
    };
    assert_eq!(first(Box::new(subject.iter_common_name())), "w-1");
    assert_eq!(first(Box::new(subject.iter_organization())), "acme-dc");
    assert_eq!(
        first(Box::new(subject.iter_organizational_unit())),
        WORKER_OU
    );
    assert_eq!(subject.iter_common_name().count(), 1);

    assert_worker_sans(&cert);

    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!cert.is_ca());
    let days =
        (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86_400;
    assert_eq!(days, 90); // plus the one-hour skew allowance
    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info().as_slice()
    );

    let id = worker_identity(&der).unwrap();
    assert_eq!(
        id,
        WorkerIdentity {
            worker_id: "w-1".into(),
            provider: "acme-dc".into()
        }
    );
}

#[test]
fn sign_worker_csr_refuses_garbage_and_bad_arguments() {
    let ca = FederationCa::generate("eu").unwrap();
    let (_, csr_pem) = generate_worker_key_and_csr("w").unwrap();
    let sign = |csr: &str| ca.sign_worker_csr(csr, "w-1", "acme", &[], 30);
    assert!(matches!(sign("not a csr"), Err(CaError::InvalidCsr(_))));
    let junk = der_to_pem("CERTIFICATE REQUEST", b"definitely not DER");
    assert!(matches!(sign(&junk), Err(CaError::InvalidCsr(_))));

    // Flip a bit in the signature (the last bytes of the DER).
    let mut der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let last = der.len() - 1;
    der[last] ^= 1;
    let tampered = der_to_pem("CERTIFICATE REQUEST", &der);
    match sign(&tampered) {
        Err(CaError::InvalidCsr(msg)) => assert!(msg.contains("signature"), "{msg}"),
        other => panic!("expected InvalidCsr, got {other:?}"),
    }

    let bad_id = ca.sign_worker_csr(&csr_pem, "not a name!", "acme", &[], 30);
    assert!(matches!(bad_id, Err(CaError::InvalidName { .. })));
    let ip_id = ca.sign_worker_csr(&csr_pem, "10.0.0.1", "acme", &[], 30);
    assert!(matches!(ip_id, Err(CaError::InvalidName { .. })));
    let bad_addr = ca.sign_worker_csr(&csr_pem, "w-1", "acme", &names(&["a b"]), 30);
    assert!(matches!(bad_addr, Err(CaError::InvalidName { .. })));
    let no_days = ca.sign_worker_csr(&csr_pem, "w-1", "acme", &[], 0);
    assert!(matches!(no_days, Err(CaError::InvalidArgument(_))));
    let too_long = ca.sign_worker_csr(&csr_pem, "w-1", "acme", &[], u32::MAX);
    assert!(matches!(too_long, Err(CaError::InvalidArgument(_))));
    let no_provider = ca.sign_worker_csr(&csr_pem, "w-1", "", &[], 30);
    assert!(matches!(no_provider, Err(CaError::InvalidArgument(_))));
}

#[test]
fn worker_identity_refuses_non_worker_certs() {
    let ca = FederationCa::generate("eu").unwrap();
    let (chain, _) = ca.issue_server_cert(&names(&["localhost"])).unwrap();
    let err = worker_identity(&parse(&chain)).unwrap_err();
    assert!(matches!(err, CaError::NotWorkerCertificate(_)), "{err:?}");
    assert!(worker_identity(&ca.cert_der()).is_err());
    assert!(worker_identity(b"garbage").is_err());
}

#[test]
fn issue_server_cert_refuses_bad_names() {
    let ca = FederationCa::generate("eu").unwrap();
    assert!(matches!(
        ca.issue_server_cert(&[]),
        Err(CaError::InvalidArgument(_))
    ));
    let bad = ca.issue_server_cert(&names(&["localhost", "*.example.eu"]));
    assert!(matches!(bad, Err(CaError::InvalidName { .. })));
    let (chain, _) = ca
        .issue_server_cert(&names(&["coord.example.eu", "::1"]))
        .unwrap();
    assert_eq!(certs(&chain).len(), 2);
    assert_eq!(certs(&chain)[1].to_vec(), ca.cert_der());
}

#[tokio::test]
async fn mutual_tls_accepts_worker_of_this_ca_only() {
    install_provider();
    let ca = FederationCa::generate("eu").unwrap();
    let (chain, key_pem) = ca.issue_server_cert(&names(&["localhost"])).unwrap();

    let (cert, key) = worker(&ca, "w-1", "acme");
    let (addr, served) = serve_once(mtls_server(&ca, &chain, &key_pem)).await;
    let got = client_exchange(mtls_client(&ca, &cert, &key), addr, "localhost").await;
    assert_eq!(got.unwrap(), b"ok");
    let peer = served.await.unwrap().unwrap();
    let id = worker_identity(&peer[0]).unwrap();
    assert_eq!(
        (id.worker_id.as_str(), id.provider.as_str()),
        ("w-1", "acme")
    );

    let other = FederationCa::generate("other").unwrap();
    let (cert, key) = worker(&other, "w-1", "acme");
    let (addr, served) = serve_once(mtls_server(&ca, &chain, &key_pem)).await;
    // The client trusts our CA (the server is genuine); the server must refuse.
    let got = client_exchange(mtls_client(&ca, &cert, &key), addr, "localhost").await;
    assert!(got.is_err(), "client should see the rejection");
    let err = served.await.unwrap().unwrap_err();
    assert!(err.to_string().to_lowercase().contains("issuer"), "{err}");
}

#[tokio::test]
async fn worker_cert_serves_tls_for_its_worker_id() {
    install_provider();
    let ca = FederationCa::generate("eu").unwrap();
    let (server_cert, server_key) = worker(&ca, "w-1", "acme");
    let (client_cert, client_key) = worker(&ca, "w-2", "globex");
    let chain = format!("{server_cert}{}", ca.cert_pem());

    let (addr, served) = serve_once(mtls_server(&ca, &chain, &server_key)).await;
    let client = mtls_client(&ca, &client_cert, &client_key);
    assert_eq!(client_exchange(client, addr, "w-1").await.unwrap(), b"ok");
    let peer = served.await.unwrap().unwrap();
    assert_eq!(worker_identity(&peer[0]).unwrap().worker_id, "w-2");

    // The worker certificate is not valid for another worker's id.
    let (addr, _served) = serve_once(mtls_server(&ca, &chain, &server_key)).await;
    let client = mtls_client(&ca, &client_cert, &client_key);
    assert!(client_exchange(client, addr, "w-3").await.is_err());
}
