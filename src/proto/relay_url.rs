//! [`RelayUrl`]: a relay's base URL and every route on it, shared by the relay's router,
//! the node's relay link and the client, so that no one derives a URL by editing text.

use std::fmt;
use std::str::FromStr;

/// Where agents keep their outbound WebSocket (and announce).
pub const ANNOUNCE_PATH: &str = "/ws/announce";
/// Where callers open their WebSocket.
pub const INPUT_PATH: &str = "/ws/input";
/// The directory route, axum syntax.
pub const DIRECTORY_ROUTE: &str = "/api/agents/{address}";
/// The directory's prefix; the address follows.
pub const DIRECTORY_PREFIX: &str = "/api/agents/";
/// Counts: agents online and known, callers, sessions.
pub const HEALTH_PATH: &str = "/health";

/// A relay's base URL: `ws://host:port` or `wss://host:port`, optionally under a path
/// prefix (a relay behind a reverse proxy). Parsing accepts the base or either socket
/// URL (`…/ws/announce`, `…/ws/input`), as the Python ecosystem writes `relay_url`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelayUrl {
    secure: bool,
    /// `host:port` (or `host`), as given.
    authority: String,
    /// Path prefix without a trailing `/` (usually empty).
    prefix: String,
}

/// Why a string is not a relay URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayUrlError {
    #[error("a relay URL starts with ws:// or wss:// (got {0:?})")]
    Scheme(String),
    #[error("a relay URL names a host (got {0:?})")]
    NoHost(String),
    #[error("a relay URL has no spaces or control characters (got {0:?})")]
    BadCharacter(String),
    #[error("a relay URL has no query or fragment (got {0:?})")]
    Query(String),
}

impl RelayUrl {
    /// Whether the relay is reached over TLS (`wss://`).
    pub fn is_secure(&self) -> bool {
        self.secure
    }

    /// `host:port` as given.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// `ws://host:port[/prefix]`.
    pub fn base(&self) -> String {
        let scheme = if self.secure { "wss" } else { "ws" };
        format!("{scheme}://{}{}", self.authority, self.prefix)
    }

    /// Where an agent connects and announces.
    pub fn announce(&self) -> String {
        format!("{}{ANNOUNCE_PATH}", self.base())
    }

    /// Where a caller connects.
    pub fn input(&self) -> String {
        format!("{}{INPUT_PATH}", self.base())
    }

    /// The relay's HTTP base: `http://` for `ws://`, `https://` for `wss://`.
    pub fn http_base(&self) -> String {
        let scheme = if self.secure { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority, self.prefix)
    }

    /// The directory entry of `address` (an `Address` or its `0x…` text).
    pub fn directory(&self, address: impl fmt::Display) -> String {
        format!("{}{DIRECTORY_PREFIX}{address}", self.http_base())
    }

    /// The relay's health counts.
    pub fn health(&self) -> String {
        format!("{}{HEALTH_PATH}", self.http_base())
    }

    /// Whether two URLs name the same relay: same scheme, host (in any letter case), port
    /// (the default one written or not) and prefix. `ws://h/ws/announce` and `ws://H:80`
    /// are the same relay; `ws://h` and `wss://h` are not.
    pub fn same_relay(&self, other: &RelayUrl) -> bool {
        self.secure == other.secure
            && self.prefix == other.prefix
            && self.normal_authority() == other.normal_authority()
    }

    /// The authority in lower case without the scheme's default port.
    fn normal_authority(&self) -> String {
        let lower = self.authority.to_ascii_lowercase();
        let default_port = if self.secure { ":443" } else { ":80" };
        match lower.strip_suffix(default_port) {
            Some(host) => host.to_owned(),
            None => lower,
        }
    }
}

impl FromStr for RelayUrl {
    type Err = RelayUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let given = s.trim();
        // Checked on the whole URL: a blank inside it would not survive being written.
        if given.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(RelayUrlError::BadCharacter(given.to_owned()));
        }
        let (secure, rest) = if let Some(r) = given.strip_prefix("ws://") {
            (false, r)
        } else if let Some(r) = given.strip_prefix("wss://") {
            (true, r)
        } else {
            return Err(RelayUrlError::Scheme(given.to_owned()));
        };
        if rest.contains(['?', '#']) {
            return Err(RelayUrlError::Query(given.to_owned()));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.starts_with(':') || authority.contains('@') {
            return Err(RelayUrlError::NoHost(given.to_owned()));
        }
        // The routes at the end (`…/ws/announce`, even twice, even `…/oo//ws/input`) and
        // trailing slashes are no part of the prefix: the base never ends with one, so it
        // always reads back as the same relay.
        let mut prefix = path.trim_end_matches('/');
        while let Some(rest) = prefix
            .strip_suffix(ANNOUNCE_PATH)
            .or_else(|| prefix.strip_suffix(INPUT_PATH))
        {
            prefix = rest.trim_end_matches('/');
        }
        Ok(RelayUrl {
            secure,
            authority: authority.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

impl fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base())
    }
}

impl serde::Serialize for RelayUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_or_either_socket_url_gives_every_route() {
        for given in [
            "ws://r:1",
            "ws://r:1/",
            "ws://r:1/ws/announce",
            "ws://r:1/ws/input/",
        ] {
            let url: RelayUrl = given.parse().unwrap();
            assert_eq!(url.base(), "ws://r:1");
            assert_eq!(url.announce(), "ws://r:1/ws/announce");
            assert_eq!(url.input(), "ws://r:1/ws/input");
            assert_eq!(url.health(), "http://r:1/health");
        }
        let a = crate::identity::Identity::from_seed([7; 32]).address();
        let tls: RelayUrl = "wss://relay.example/oo/ws/announce".parse().unwrap();
        assert!(tls.is_secure());
        assert_eq!(tls.input(), "wss://relay.example/oo/ws/input");
        assert_eq!(
            tls.directory(a),
            format!("https://relay.example/oo/api/agents/{a}")
        );
    }

    #[test]
    fn the_same_relay_is_recognised_however_it_is_written() {
        let url = |s: &str| s.parse::<RelayUrl>().unwrap();
        let public = url("wss://relay.example");
        for same in [
            "wss://relay.example/ws/announce",
            "wss://Relay.Example:443/",
            "wss://relay.example/ws/input",
        ] {
            assert!(public.same_relay(&url(same)), "{same}");
        }
        for other in [
            "ws://relay.example",
            "wss://relay.example:8443",
            "wss://relay.example/oo",
            "wss://relay.example.evil",
        ] {
            assert!(!public.same_relay(&url(other)), "{other}");
        }
        assert!(url("ws://127.0.0.1:80").same_relay(&url("ws://127.0.0.1/ws/announce")));
    }

    #[test]
    fn anything_else_is_refused_with_a_reason() {
        for bad in [
            "127.0.0.1:9",
            "http://r:1",
            "ws://",
            "ws://:1",
            "ws://r:1/?x=1",
            // Found by fuzz/relay_url: accepted, its base (`ws:// `) was not a relay URL.
            "ws:// //",
            "ws://r 1",
            "ws://r\u{7f}",
            // Found by fuzz/relay_url: a tab at the end of the prefix did not read back.
            "ws://r:1/oo\t/",
            "ws://r:1/o o/ws/input",
        ] {
            assert!(bad.parse::<RelayUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_relays_own_urls_read_back_as_the_same_relay() {
        for given in [
            "ws://r:1/oo//ws/input",
            "wss://r/a/b/",
            "ws://r//ws/announce",
            // Found by fuzz/relay_url: the base ended with a route and lost it when read.
            "ws://r:5///r:5/ws/announce/ws/announce/",
            "ws://r/ws/input/ws/announce",
        ] {
            let url: RelayUrl = given.parse().unwrap();
            for again in [url.base(), url.announce(), url.input()] {
                assert_eq!(again.parse::<RelayUrl>().unwrap(), url, "{given} → {again}");
            }
        }
    }
}
