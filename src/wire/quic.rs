//! QUIC between a parent and its child, once SSH has staged and started the child.
//!
//! SSH stays the way in; QUIC is the link afterwards when UDP gets through (docs/remote.md,
//! "QUIC"). Neither end has a certificate anyone signed, so trust comes from the SSH channel:
//!
//! - Each node makes a fresh self-signed certificate when it starts ([`Identity`]), and the
//!   two ends exchange the certificates' sha256 fingerprints over the SSH channel the parent
//!   opened (host key verified): the parent's goes down in the child's start frame, the
//!   child's comes up with the port it listens on.
//! - The handshake is mutual TLS 1.3 with both certificates pinned ([`Pinned`]): the parent
//!   (the QUIC client) accepts only the certificate the child announced, the child only the
//!   parent's, and each end's handshake signature is checked against the pinned certificate's
//!   key, so a copy of a certificate without its key gets nowhere. Nothing else on the
//!   network can open a connection to a child's port, nor pose as the child.
//! - The child listens on a UDP port from a range ([`Listener::bind`]); the parent gives up
//!   on QUIC after [`CONNECT_TIMEOUT`] and keeps the SSH link (UDP blocked, a firewall).
//! - The connection outlives address changes on the parent's side: the parent's socket is
//!   bound to the wildcard address, so its packets leave from whatever address it has now,
//!   and the child validates the new path and carries on (QUIC connection migration).

use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The protocol named in the handshake (ALPN): a QUIC peer that is not arbor is refused there.
const ALPN: &[u8] = b"arbor";

/// The name the parent asks for; meaningless, since the certificate is pinned, but TLS wants one.
const SERVER_NAME: &str = "arbor";

/// How long the parent waits for the QUIC handshake before it keeps the link on SSH: a LAN
/// handshake takes a millisecond, one across a continent well under 300 ms.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why QUIC could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("no free UDP port in {first}-{last}: {last_error}")]
    NoPort {
        first: u16,
        last: u16,
        last_error: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no QUIC handshake within {0:?} (UDP blocked?)")]
    Timeout(Duration),
    #[error("{0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
}

/// The sha256 of a certificate's DER, as lowercase hex: what the two ends pin.
pub fn fingerprint(der: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(der))
}

/// A node's certificate for this run: self-signed, made when the node starts, never written
/// to disk.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    fingerprint: String,
}

impl Identity {
    pub fn generate() -> Result<Self, QuicError> {
        let made = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(|e| QuicError::Certificate(e.to_string()))?;
        let cert = made.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
        let fingerprint = fingerprint(&cert);
        Ok(Identity {
            cert,
            key,
            fingerprint,
        })
    }

    /// What the other end pins: the sha256 of this certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn chain(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![self.cert.clone()],
            PrivateKeyDer::Pkcs8(self.key.clone_key()),
        )
    }
}

/// How the link's congestion is controlled (`--congestion`). Cubic, as TCP does, by default:
/// it fills a thin link as SSH does, also while the far end is too busy to acknowledge
/// promptly, where quinn's BBR (experimental there) fell to 0.9 of it with the round trip
/// under a millisecond. BBR keeps the link's queue short and does not take random loss for
/// congestion, for operators on lossy links (docs/remote.md, "QUIC between nodes", has the
/// measurements).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    #[default]
    Cubic,
    NewReno,
    Bbr,
}

impl Congestion {
    pub fn parse(s: &str) -> Option<Congestion> {
        [Congestion::Cubic, Congestion::NewReno, Congestion::Bbr]
            .into_iter()
            .find(|c| c.name() == s)
    }

    /// As `--congestion` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
            Congestion::Bbr => "bbr",
        }
    }
}

/// The link's timing, from the node configuration.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// How often an idle connection sends a keep-alive (the link's heartbeat interval).
    pub keep_alive: Duration,
    /// How long a connection that hears nothing stays open: the link timeout plus the
    /// reconnect grace, so an outage the link rides out does not close the connection.
    pub idle: Duration,
    pub congestion: Congestion,
}

impl Tuning {
    fn transport(&self) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive));
        // An idle timeout past what QUIC can encode means none.
        t.max_idle_timeout(quinn::IdleTimeout::try_from(self.idle).ok());
        match self.congestion {
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
            Congestion::NewReno => t.congestion_controller_factory(Arc::new(
                quinn::congestion::NewRenoConfig::default(),
            )),
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
        };
        Arc::new(t)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly one certificate, by its sha256, and checks the handshake's signature
/// against that certificate's key. Serves as the parent's server verifier and the child's
/// client verifier.
#[derive(Debug)]
pub struct Pinned {
    fingerprint: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Pinned {
    pub fn new(fingerprint: &str) -> Self {
        Pinned {
            fingerprint: fingerprint.to_ascii_lowercase(),
            algorithms: provider().signature_verification_algorithms,
        }
    }

    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if fingerprint(end_entity) == self.fingerprint {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The child's end: a UDP port that takes QUIC connections from its parent only.
pub struct Listener {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
}

impl Listener {
    /// Listens on the first free port of `ports` at `ip`, accepting only a client that
    /// presents the certificate `parent` pins.
    pub fn bind(
        ip: IpAddr,
        ports: RangeInclusive<u16>,
        me: &Identity,
        parent: &str,
        tuning: &Tuning,
    ) -> Result<Listener, QuicError> {
        let (chain, key) = me.chain();
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(Pinned::new(parent)))
            .with_single_cert(chain, key)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| QuicError::Certificate(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(tuning.transport());
        // The parent may move (a laptop's address changes): follow it.
        config.migration(true);
        let (first, last) = (*ports.start(), *ports.end());
        let mut last_error = std::io::Error::other("empty port range");
        for port in ports {
            match UdpSocket::bind(SocketAddr::new(ip, port)) {
                Ok(socket) => {
                    widen_receive_buffer(&socket);
                    let addr = socket.local_addr()?;
                    let endpoint = quinn::Endpoint::new(
                        quinn::EndpointConfig::default(),
                        Some(config),
                        socket,
                        Arc::new(quinn::TokioRuntime),
                    )?;
                    return Ok(Listener { endpoint, addr });
                }
                Err(e) => last_error = e,
            }
        }
        Err(QuicError::NoPort {
            first,
            last,
            last_error,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next connection whose handshake completed (a peer without the parent's
    /// certificate never gets this far), or `None` once the listener is closed.
    pub async fn accept(&self) -> Option<Result<quinn::Connection, QuicError>> {
        let incoming = self.endpoint.accept().await?;
        Some(async { Ok(incoming.await?) }.await)
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"closed");
    }
}

/// The parent's end: connects to the child at `addr`, pinning the certificate `child`, with
/// the parent's own certificate `me`, and gives up after `timeout`.
/// What a link's socket asks for as its receive buffer: a burst of a few hundred
/// milliseconds at LAN speed. With the kernel's default (about 200 KiB), a receiver busy for
/// a moment (a relay writing and hashing an artifact, a loaded host) overflows it and the
/// kernel drops whole batches of packets, which the sender must send again: in the lab, an
/// artifact's copy over QUIC cost up to 1.7 times its size on the link.
const RECEIVE_BUFFER: libc::c_int = 8 << 20;

/// Asks for [`RECEIVE_BUFFER`]: past `net.core.rmem_max` only a privileged process may
/// (`SO_RCVBUFFORCE`); otherwise the kernel gives what the limit allows. Best effort.
fn widen_receive_buffer(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let set = |option: libc::c_int| {
        let size = RECEIVE_BUFFER;
        // SAFETY: a valid socket descriptor, and a c_int option value of its size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    if !set(libc::SO_RCVBUFFORCE) {
        set(libc::SO_RCVBUF);
    }
}

pub async fn connect(
    addr: SocketAddr,
    me: &Identity,
    child: &str,
    tuning: &Tuning,
    timeout: Duration,
) -> Result<(quinn::Endpoint, quinn::Connection), QuicError> {
    let (chain, key) = me.chain();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned::new(child)))
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| QuicError::Certificate(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(tuning.transport());
    // The wildcard address: packets leave from whatever address the parent has when they
    // are sent, so the connection follows an address change.
    let any: IpAddr = if addr.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0))?;
    widen_receive_buffer(&socket);
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let connecting = endpoint.connect_with(config, addr, SERVER_NAME)?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(connection)) => Ok((endpoint, connection)),
        Ok(Err(e)) => {
            endpoint.close(0u32.into(), b"");
            Err(e.into())
        }
        Err(_) => {
            endpoint.close(0u32.into(), b"");
            Err(QuicError::Timeout(timeout))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuning() -> Tuning {
        Tuning {
            keep_alive: Duration::from_secs(1),
            idle: Duration::from_secs(10),
            congestion: Congestion::default(),
        }
    }

    fn loopback() -> IpAddr {
        std::net::Ipv4Addr::LOCALHOST.into()
    }

    /// A child listening on loopback for `parent`, echoing one stream per connection.
    fn child(me: &Identity, parent: &str) -> Listener {
        Listener::bind(loopback(), 40000..=40999, me, parent, &tuning()).unwrap()
    }

    fn serve_echo(listener: Listener) -> tokio::task::JoinHandle<Vec<String>> {
        tokio::spawn(async move {
            let mut refused = Vec::new();
            while let Some(conn) = listener.accept().await {
                match conn {
                    Ok(conn) => {
                        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
                        let buf = recv.read_to_end(1 << 20).await.unwrap();
                        send.write_all(&buf).await.unwrap();
                        send.finish().unwrap();
                        let _ = send.stopped().await;
                        return refused;
                    }
                    Err(e) => refused.push(e.to_string()),
                }
            }
            refused
        })
    }

    #[tokio::test]
    async fn pinned_both_ways_carries_a_stream() {
        let (parent, kid) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let listener = child(&kid, parent.fingerprint());
        let addr = listener.local_addr();
        let served = serve_echo(listener);
        let (_endpoint, conn) =
            connect(addr, &parent, kid.fingerprint(), &tuning(), CONNECT_TIMEOUT)
                .await
                .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"hello over quic").await.unwrap();
        send.finish().unwrap();
        let back = recv.read_to_end(1 << 20).await.unwrap();
        assert_eq!(back, b"hello over quic");
        assert!(served.await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_parent_refuses_a_child_whose_certificate_is_not_the_pinned_one() {
        let (parent, kid, impostor) = (
            Identity::generate().unwrap(),
            Identity::generate().unwrap(),
            Identity::generate().unwrap(),
        );
        // The impostor answers at the address, with its own certificate.
        let listener = child(&impostor, parent.fingerprint());
        let addr = listener.local_addr();
        let _served = serve_echo(listener);
        let err = connect(addr, &parent, kid.fingerprint(), &tuning(), CONNECT_TIMEOUT)
            .await
            .expect_err("connected to a certificate it did not pin");
        assert!(err.to_string().contains("certificate"), "{err}");
    }

    #[tokio::test]
    async fn a_child_refuses_a_client_without_its_parents_certificate() {
        let (parent, kid, stranger) = (
            Identity::generate().unwrap(),
            Identity::generate().unwrap(),
            Identity::generate().unwrap(),
        );
        let listener = child(&kid, parent.fingerprint());
        let addr = listener.local_addr();
        let served = serve_echo(listener);
        // The stranger knows the child's fingerprint (it could see the certificate on the
        // wire) but has not the parent's key.
        let refused = match connect(
            addr,
            &stranger,
            kid.fingerprint(),
            &tuning(),
            CONNECT_TIMEOUT,
        )
        .await
        {
            Err(e) => e.to_string(),
            // TLS 1.3: the client may finish before the server checks its certificate; then
            // the connection closes at once and no stream gets through.
            Ok((_endpoint, conn)) => {
                let opened = async {
                    let (mut send, mut recv) = conn.open_bi().await?;
                    send.write_all(b"let me in").await?;
                    send.finish()?;
                    anyhow::Ok(recv.read_to_end(1 << 20).await?)
                }
                .await;
                assert!(opened.is_err(), "the stranger's stream was served");
                opened.unwrap_err().to_string()
            }
        };
        assert!(!refused.is_empty());
        served.abort();
    }

    #[tokio::test]
    async fn nothing_listening_gives_up_within_the_timeout() {
        // A port nobody listens on: on loopback the kernel answers with ICMP, which quinn
        // ignores, so this is what a firewall that drops UDP looks like too.
        let socket = UdpSocket::bind((loopback(), 0)).unwrap();
        let addr = socket.local_addr().unwrap();
        drop(socket);
        let (parent, kid) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let started = std::time::Instant::now();
        let err = connect(
            addr,
            &parent,
            kid.fingerprint(),
            &tuning(),
            Duration::from_millis(300),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(err, QuicError::Timeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_busy_port_range_moves_on_and_a_full_one_says_which() {
        let (parent, kid) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let taken = UdpSocket::bind((loopback(), 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = Listener::bind(
            loopback(),
            port..=port,
            &kid,
            parent.fingerprint(),
            &tuning(),
        )
        .err()
        .unwrap();
        assert!(
            err.to_string()
                .contains(&format!("no free UDP port in {port}-{port}")),
            "{err}"
        );
        if port < u16::MAX {
            let next = Listener::bind(
                loopback(),
                port..=port + 1,
                &kid,
                parent.fingerprint(),
                &tuning(),
            );
            // The next port may be taken by someone else too; when it is free, it is used.
            if let Ok(l) = next {
                assert_eq!(l.local_addr().port(), port + 1);
            }
        }
    }
}
