//! Tests of the data-plane QUIC endpoints: real QUIC with mutual TLS on
//! loopback, with certificates from the federation CA.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, Endpoint, VarInt, WriteError};

use super::*;
use crate::frame::{Frame, FrameError, read_frame, write_frame};
use sovra_proto::ca::{FederationCa, generate_worker_key_and_csr};

const TIMEOUT: Duration = Duration::from_secs(10);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// TLS material for worker `id` signed by `ca`, with `extra` address SANs.
fn identity_with(ca: &FederationCa, id: &str, provider: &str, extra: &[&str]) -> TlsIdentity {
    let (key_pem, csr_pem) = generate_worker_key_and_csr(id).unwrap();
    let mut addresses = vec!["127.0.0.1".to_string()];
    addresses.extend(extra.iter().map(|s| s.to_string()));
    let cert_pem = ca
        .sign_worker_csr(&csr_pem, id, provider, &addresses, 30)
        .unwrap();
    TlsIdentity {
        cert_pem,
        key_pem,
        ca_pem: ca.cert_pem().to_string(),
    }
}

pub(crate) fn identity(ca: &FederationCa, id: &str, provider: &str) -> TlsIdentity {
    identity_with(ca, id, provider, &[])
}

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {TIMEOUT:?}"))
}

/// Two workers of one federation: (a, b, b's address).
fn two_workers(ca: &FederationCa) -> (Endpoint, Endpoint, SocketAddr) {
    let a = endpoint(loopback(), &identity(ca, "w-a", "prov-a")).unwrap();
    let b = endpoint(loopback(), &identity(ca, "w-b", "prov-b")).unwrap();
    let addr = b.local_addr().unwrap();
    (a, b, addr)
}

/// Dials `server` from `a` (expecting w-b) and accepts on `server`.
async fn connected(a: &Endpoint, server: &Endpoint, addr: SocketAddr) -> (Connection, Connection) {
    let dial = connect(a, addr, "w-b", TIMEOUT);
    let accept = async { server.accept().await.unwrap().await.unwrap() };
    let (dialed, accepted) = bounded("connecting", async { tokio::join!(dial, accept) }).await;
    (dialed.unwrap(), accepted)
}

/// The server sees the connection attempt but its handshake fails with an
/// error mentioning `why`: it never yields an established connection.
async fn assert_server_refuses(server: &Endpoint, why: &str) {
    let incoming = bounded("accept", server.accept()).await.unwrap();
    match bounded("server handshake", incoming.into_future()).await {
        Err(e) => assert!(e.to_string().contains(why), "{e}"),
        Ok(conn) => panic!(
            "the server accepted a connection from {:?}",
            peer_identity(&conn)
        ),
    }
}

/// The client must fail: at connect, or (in TLS 1.3 the server checks the
/// client's certificate after the client's handshake completes) by the
/// server closing the connection at once with a TLS alert.
async fn assert_client_refused(result: Result<Connection, impl std::fmt::Debug>, why: &str) {
    if let Ok(conn) = result {
        let reason = bounded("the refused connection's close", conn.closed()).await;
        assert!(
            matches!(reason, quinn::ConnectionError::ConnectionClosed(_)),
            "{reason:?}"
        );
        assert!(reason.to_string().contains(why), "{reason}");
    }
}

fn activations(start_pos: u32, sample: bool) -> Frame {
    Frame::Activations {
        session: 42,
        start_pos,
        rows: 2,
        hidden: 3,
        sample,
        data: vec![0.5, -1.0, 2.0, 3.5, -0.25, 1e-3],
    }
}

#[tokio::test]
async fn frames_flow_in_order_between_mutually_authenticated_workers() {
    let ca = FederationCa::generate("test").unwrap();
    let (a, b, addr) = two_workers(&ca);
    let (to_b, from_a) = connected(&a, &b, addr).await;
    let expected_b = PeerIdentity {
        worker_id: "w-b".into(),
        provider: "prov-b".into(),
    };
    let expected_a = PeerIdentity {
        worker_id: "w-a".into(),
        provider: "prov-a".into(),
    };
    assert_eq!(peer_identity(&to_b).unwrap(), expected_b);
    assert_eq!(peer_identity(&from_a).unwrap(), expected_a);
    let sent = vec![activations(0, false), activations(2, true)];
    let frames = sent.clone();
    let writer = tokio::spawn(async move {
        let mut send = to_b.open_uni().await.unwrap();
        for frame in &frames {
            write_frame(&mut send, frame).await.unwrap();
        }
        send.finish().unwrap();
        // Keep the connection until b has everything.
        send.stopped().await.unwrap();
        to_b
    });
    let mut recv = bounded("accept_uni", from_a.accept_uni()).await.unwrap();
    for frame in sent {
        let got = bounded("read_frame", read_frame(&mut recv)).await;
        assert_eq!(got, Ok(Some(frame)));
    }
    assert_eq!(read_frame(&mut recv).await, Ok(None), "clean end of stream");
    bounded("writer", writer).await.unwrap();
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let ca = FederationCa::generate("test").unwrap();
    let other = FederationCa::generate("intruder").unwrap();
    let b = endpoint(loopback(), &identity(&ca, "w-b", "prov-b")).unwrap();
    let addr = b.local_addr().unwrap();
    // The intruder trusts the real CA (so it could verify b) but its own
    // certificate is signed by another CA.
    let mut forged = identity(&other, "w-a", "prov-a");
    forged.ca_pem = ca.cert_pem().to_string();
    let intruder = endpoint(loopback(), &forged).unwrap();
    let (client, ()) = tokio::join!(
        connect(&intruder, addr, "w-b", TIMEOUT),
        assert_server_refuses(&b, "UnknownIssuer")
    );
    assert_client_refused(client, "UnknownIssuer").await;
}

#[tokio::test]
async fn a_server_from_another_ca_is_refused() {
    let ca = FederationCa::generate("test").unwrap();
    let other = FederationCa::generate("intruder").unwrap();
    let a = endpoint(loopback(), &identity(&ca, "w-a", "prov-a")).unwrap();
    let mut fake = identity(&other, "w-b", "prov-b");
    fake.ca_pem = ca.cert_pem().to_string();
    let fake_b = endpoint(loopback(), &fake).unwrap();
    let addr = fake_b.local_addr().unwrap();
    let (client, ()) = tokio::join!(
        connect(&a, addr, "w-b", TIMEOUT),
        assert_server_refuses(&fake_b, "UnknownIssuer")
    );
    assert!(
        matches!(client, Err(QuicError::Connect { .. })),
        "{client:?}"
    );
}

#[tokio::test]
async fn dialing_the_wrong_worker_id_fails() {
    let ca = FederationCa::generate("test").unwrap();
    let (a, b, addr) = two_workers(&ca);
    let (client, ()) = tokio::join!(
        connect(&a, addr, "w-c", TIMEOUT),
        assert_server_refuses(&b, "not valid for name")
    );
    let err = client.unwrap_err();
    assert!(matches!(err, QuicError::Connect { .. }), "{err:?}");
    let ip = connect(&a, addr, "127.0.0.1", TIMEOUT).await.unwrap_err();
    assert!(matches!(ip, QuicError::PeerIdentity(_)), "{ip:?}");
}

#[tokio::test]
async fn a_certificate_naming_the_peer_only_as_an_address_is_refused() {
    let ca = FederationCa::generate("test").unwrap();
    let a = endpoint(loopback(), &identity(&ca, "w-a", "prov-a")).unwrap();
    // w-x's certificate carries "w-b" as a DNS address SAN, so TLS name
    // verification for "w-b" passes; the CN check must catch it.
    let x = endpoint(loopback(), &identity_with(&ca, "w-x", "prov-x", &["w-b"])).unwrap();
    let addr = x.local_addr().unwrap();
    let serve = async {
        if let Some(incoming) = x.accept().await {
            let _ = incoming.await;
        }
    };
    let (client, ()) = tokio::join!(connect(&a, addr, "w-b", TIMEOUT), bounded("serve", serve));
    let err = client.unwrap_err();
    assert!(matches!(err, QuicError::PeerIdentity(_)), "{err:?}");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let ca = FederationCa::generate("test").unwrap();
    let b = endpoint(loopback(), &identity(&ca, "w-b", "prov-b")).unwrap();
    let addr = b.local_addr().unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().into()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let anonymous = Endpoint::client(loopback()).unwrap();
    let dial = async {
        let connecting = anonymous.connect_with(config, addr, "w-b").unwrap();
        tokio::time::timeout(TIMEOUT, connecting).await.unwrap()
    };
    let (client, ()) = tokio::join!(dial, assert_server_refuses(&b, "no certificates"));
    assert_client_refused(client, "no certificates").await;
}

#[tokio::test]
async fn a_malformed_frame_stops_the_stream_with_an_error_code() {
    let ca = FederationCa::generate("test").unwrap();
    let (a, b, addr) = two_workers(&ca);
    let (to_b, from_a) = connected(&a, &b, addr).await;
    let mut send = to_b.open_uni().await.unwrap();
    let mut garbage = 8u32.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"NOTMAGIC");
    send.write_all(&garbage).await.unwrap();
    let mut recv = bounded("accept_uni", from_a.accept_uni()).await.unwrap();
    let got = bounded("read_frame", read_frame(&mut recv)).await;
    assert_eq!(got, Err(FrameError::BadMagic));
    let code = VarInt::from_u32(CODE_MALFORMED_FRAME);
    recv.stop(code).unwrap();
    let stopped = bounded("stopped", send.stopped()).await;
    assert_eq!(stopped, Ok(Some(code)));
    let write = send.write_all(b"more").await;
    assert!(
        matches!(write, Err(WriteError::Stopped(c)) if c == code),
        "{write:?}"
    );
    let frame = write_frame(&mut send, &activations(0, true)).await;
    assert!(matches!(frame, Err(FrameError::Io(_))), "{frame:?}");
    // The connection itself survives a stopped stream.
    assert!(to_b.close_reason().is_none() && from_a.close_reason().is_none());
}

#[tokio::test]
async fn unusable_tls_material_is_refused() {
    let ca = FederationCa::generate("test").unwrap();
    let good = identity(&ca, "w-a", "prov-a");
    let cases = [
        TlsIdentity {
            cert_pem: "not pem".into(),
            ..good.clone()
        },
        TlsIdentity {
            key_pem: String::new(),
            ..good.clone()
        },
        TlsIdentity {
            ca_pem: String::new(),
            ..good.clone()
        },
    ];
    for bad in cases {
        let err = endpoint(loopback(), &bad).unwrap_err();
        assert!(matches!(err, QuicError::Tls(_)), "{err:?}");
    }
}

/// Worker w-b on a runtime of its own, accepting connections and reading their streams until
/// the runtime is shut down, which ends it as a process killed outright ends: nothing is sent.
fn crashable_server(identity: &TlsIdentity) -> (tokio::runtime::Runtime, SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let socket = std::net::UdpSocket::bind(loopback()).unwrap();
    let addr = socket.local_addr().unwrap();
    let identity = identity.clone();
    runtime.spawn(async move {
        let server = endpoint_from_socket(socket, &identity).unwrap();
        let mut held = Vec::new();
        while let Some(incoming) = server.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let reader = conn.clone();
            tokio::spawn(async move {
                while let Ok(mut stream) = reader.accept_uni().await {
                    let _ = stream.read_to_end(1 << 20).await;
                }
            });
            held.push(conn);
        }
    });
    (runtime, addr)
}

/// A UDP socket on `addr` once the process before has let it go.
async fn rebind(addr: SocketAddr) -> std::net::UdpSocket {
    for _ in 0..100 {
        if let Ok(socket) = std::net::UdpSocket::bind(addr) {
            return socket;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{addr} stayed in use");
}

/// Answers every datagram on `socket` with a stateless reset whose token is random (as anyone
/// on the address but the worker's key could send); returns how many it sent.
async fn forge_resets(socket: std::net::UdpSocket, window: Duration) -> usize {
    socket.set_nonblocking(true).unwrap();
    let socket = tokio::net::UdpSocket::from_std(socket).unwrap();
    let mut sent = 0;
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Ok((len, from))) =
        tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
    {
        if len < 43 {
            continue;
        }
        // A short header's first byte (fixed bit set), then unpredictable bytes; the last 16
        // are the token.
        let mut reset: Vec<u8> = (0..len - 1)
            .map(|i| (i as u8).wrapping_mul(151) ^ 0x5a)
            .collect();
        reset[0] = 0x40 | (reset[0] & 0x3f);
        socket.send_to(&reset, from).await.unwrap();
        sent += 1;
    }
    sent
}

#[tokio::test]
async fn a_worker_restarted_on_its_address_ends_its_peers_old_connections_at_once() {
    let ca = FederationCa::generate("test federation").unwrap();
    let a = endpoint(loopback(), &identity(&ca, "w-a", "prov-a")).unwrap();
    let b = identity(&ca, "w-b", "prov-b");
    let frame = |start_pos| Frame::Activations {
        session: 42,
        start_pos,
        rows: 1,
        hidden: 512,
        sample: false,
        data: vec![0.5; 512],
    };
    // The same worker restarted on the address, then someone else on it.
    for same_worker in [true, false] {
        let (runtime, addr) = crashable_server(&b);
        let conn = bounded("dialing", connect(&a, addr, "w-b", TIMEOUT))
            .await
            .unwrap();
        let mut stream = conn.open_uni().await.unwrap();
        write_frame(&mut stream, &frame(0)).await.unwrap();
        // Past the handshake (the server has confirmed it), as a link in service is.
        bounded("the handshake's confirmation", async {
            while conn.stats().frame_rx.handshake_done == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        runtime.shutdown_background();
        let socket = rebind(addr).await;
        let window = Duration::from_secs(3);
        if same_worker {
            let _restarted = endpoint_from_socket(socket, &b).unwrap();
            // The peer's next frame reaches the new process, which knows no such connection.
            let _ = write_frame(&mut stream, &frame(1)).await;
            let ended = tokio::time::timeout(window, conn.closed()).await;
            assert!(
                matches!(ended, Ok(quinn::ConnectionError::Reset)),
                "the old connection was not reset: {ended:?}"
            );
        } else {
            // Resets not made with the worker's key are ignored: a third party on the address
            // cannot end the connection (it ends at the idle timeout).
            let forger = tokio::spawn(forge_resets(socket, window));
            let _ = write_frame(&mut stream, &frame(1)).await;
            let ended = tokio::time::timeout(window, conn.closed()).await;
            assert!(
                ended.is_err(),
                "a forged reset ended the connection: {ended:?}"
            );
            assert!(forger.await.unwrap() > 0, "no reset was forged");
        }
    }
}

#[test]
fn connection_ids_carry_a_tag_only_the_worker_key_makes() {
    use quinn::ConnectionIdGenerator;
    let key = |byte: u8| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[byte; 32]);
    let (mut mine, other) = (KeyedCids(key(1)), KeyedCids(key(2)));
    let ids: Vec<quinn::ConnectionId> = (0..100).map(|_| mine.generate_cid()).collect();
    assert!(
        ids.iter()
            .all(|id| id.len() == 16 && mine.validate(id).is_ok())
    );
    assert!(ids.iter().all(|id| other.validate(id).is_err()));
    let distinct: std::collections::HashSet<Vec<u8>> = ids.iter().map(|id| id.to_vec()).collect();
    assert_eq!(distinct.len(), ids.len());
    let mut altered = ids[0].to_vec();
    altered[0] ^= 1;
    assert!(mine.validate(&quinn::ConnectionId::new(&altered)).is_err());
    assert!(mine.validate(&quinn::ConnectionId::new(&[0; 8])).is_err());
}
