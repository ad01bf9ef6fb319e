//! Listen addresses as given on the command line: `vsock:PORT`, `vsock:CID:PORT`,
//! `unix:PATH`, `tcp:HOST:PORT` and `stdio`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The vsock CID meaning "any address of this machine" (VMADDR_CID_ANY).
pub const VSOCK_CID_ANY: u32 = u32::MAX;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Vsock {
        cid: u32,
        port: u32,
    },
    Unix(PathBuf),
    /// Host (name or IP literal, IPv6 in brackets) and port, resolved at bind time.
    Tcp(String),
    Stdio,
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid listen address `{s}`: {why}");
        if s == "stdio" {
            return Ok(ListenAddr::Stdio);
        }
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err(bad(
                "expected vsock:[CID:]PORT, unix:PATH, tcp:HOST:PORT or stdio",
            ));
        };
        match scheme {
            "vsock" => {
                let parse = |n: &str, what: &str| {
                    n.parse::<u32>()
                        .map_err(|_| bad(&format!("{what} must be a number")))
                };
                match rest.split_once(':') {
                    None => Ok(ListenAddr::Vsock {
                        cid: VSOCK_CID_ANY,
                        port: parse(rest, "port")?,
                    }),
                    Some((cid, port)) => Ok(ListenAddr::Vsock {
                        cid: parse(cid, "CID")?,
                        port: parse(port, "port")?,
                    }),
                }
            }
            "unix" if !rest.is_empty() => Ok(ListenAddr::Unix(PathBuf::from(rest))),
            "unix" => Err(bad("empty path")),
            "tcp" => {
                let Some((host, port)) = rest.rsplit_once(':') else {
                    return Err(bad("expected tcp:HOST:PORT"));
                };
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(bad("expected tcp:HOST:PORT with a port of 0..65535"));
                }
                Ok(ListenAddr::Tcp(rest.to_string()))
            }
            _ => Err(bad("unknown scheme")),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Vsock { cid, port } if *cid == VSOCK_CID_ANY => write!(f, "vsock:{port}"),
            ListenAddr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
            ListenAddr::Stdio => f.write_str("stdio"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            "vsock:807".parse(),
            Ok(ListenAddr::Vsock {
                cid: VSOCK_CID_ANY,
                port: 807
            })
        );
        assert_eq!(
            "vsock:3:52".parse(),
            Ok(ListenAddr::Vsock { cid: 3, port: 52 })
        );
        assert_eq!(
            "unix:/run/a.sock".parse(),
            Ok(ListenAddr::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "tcp:[::1]:80".parse(),
            Ok(ListenAddr::Tcp("[::1]:80".into()))
        );
        assert_eq!("stdio".parse(), Ok(ListenAddr::Stdio));
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "bogus:1",
            "vsock:",
            "vsock:x",
            "vsock:1:y",
            "unix:",
            "tcp:nohost",
            "tcp::1",
            "tcp:h:99999",
        ] {
            assert!(s.parse::<ListenAddr>().is_err(), "{s}");
        }
    }
}
