//! TLS channels to the coordinator: server verified against the federation CA, optional client
//! certificate (workers), optional bearer token (operators and tenants).

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The URL is not an `https://host:port` URL.
    #[error("invalid coordinator URL `{url}`: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// TLS setup or the connection failed.
    #[error("cannot connect to the coordinator at {url}: {reason}")]
    Connect {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// A channel whose requests carry `authorization: Bearer <token>` when a token is set.
pub type AuthChannel = InterceptedService<Channel, BearerAuth>;

/// Adds the bearer token to every request.
#[derive(Debug, Clone, Default)]
pub struct BearerAuth {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl BearerAuth {
    /// An interceptor sending `token` (or nothing when None or not a valid header value).
    pub fn new(token: Option<&str>) -> Self {
        Self {
            header: token.and_then(|t| format!("Bearer {}", t.trim()).parse().ok()),
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// Host part of an `https://host:port` URL (brackets removed from IPv6 literals).
pub fn url_host(url: &str) -> Result<String, ChannelError> {
    let bad = |reason: &str| ChannelError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("it must start with https://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(authority)
    };
    if host.is_empty() {
        return Err(bad("it names no host"));
    }
    Ok(host.to_string())
}

/// `host:port` of an `https://host:port` URL.
pub fn url_authority(url: &str) -> Result<String, ChannelError> {
    url_host(url)?;
    let rest = url.trim_start_matches("https://");
    let authority = rest.split('/').next().unwrap_or_default();
    if authority
        .rsplit_once(':')
        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    {
        return Err(ChannelError::Url {
            url: url.to_string(),
            reason: "it names no port".into(),
        });
    }
    Ok(authority.to_string())
}

/// How long opening a channel may take, TLS handshake included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a TLS channel to the coordinator at `url`, trusting only `ca_pem`, presenting
/// `identity` (certificate and key PEM) when given.
pub async fn connect(
    url: &str,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    token: Option<&str>,
) -> Result<AuthChannel, ChannelError> {
    let host = url_host(url)?;
    let connect_err = |reason: String| ChannelError::Connect {
        url: url.to_string(),
        reason,
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(host);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Channel::from_shared(url.to_string())
        .map_err(|e| ChannelError::Url {
            url: url.to_string(),
            reason: e.to_string(),
        })?
        .tls_config(tls)
        .map_err(|e| connect_err(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        // A coordinator that stops answering mid-request is noticed by its missing pings.
        .keep_alive_while_idle(true);
    // The whole connection, TLS handshake included (a coordinator that accepts the TCP
    // connection but does not answer would otherwise hold the caller forever).
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| {
            connect_err(format!(
                "no answer within {} s (is the coordinator running and reachable?)",
                CONNECT_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| connect_err(error_chain(&e)))?;
    Ok(InterceptedService::new(channel, BearerAuth::new(token)))
}

/// An error and all its sources on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_of_urls() {
        assert_eq!(url_host("https://127.0.0.1:7070").unwrap(), "127.0.0.1");
        assert_eq!(
            url_host("https://coord.example.eu:7070/x").unwrap(),
            "coord.example.eu"
        );
        assert_eq!(url_host("https://[::1]:7070").unwrap(), "::1");
        assert!(url_host("http://127.0.0.1:7070").is_err());
        assert!(url_host("https://:7070").is_err());
        assert_eq!(
            url_authority("https://localhost:7070").unwrap(),
            "localhost:7070"
        );
        assert!(url_authority("https://localhost").is_err());
    }
}
