//! Connect addresses as given to `--connect`: `vsock:CID:PORT`, `unix:PATH`,
//! `tcp:HOST:PORT`, `hybrid:PATH:PORT` and `exec:COMMAND`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::transport::ListenAddr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectAddr {
    Vsock {
        cid: u32,
        port: u32,
    },
    Unix(PathBuf),
    /// `HOST:PORT`, resolved at connect time.
    Tcp(String),
    /// A Firecracker / vhost-device-vsock Unix socket and the guest port to ask for.
    Hybrid {
        path: PathBuf,
        port: u32,
    },
    /// A program and its arguments, split like a shell would but without one.
    Exec(Vec<String>),
}

impl FromStr for ConnectAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid connect address `{s}`: {why}");
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err(bad(
                "expected vsock:CID:PORT, unix:PATH, tcp:HOST:PORT, hybrid:PATH:PORT or exec:COMMAND",
            ));
        };
        let number = |n: &str, what: &str| {
            n.parse::<u32>()
                .map_err(|_| bad(&format!("{what} must be a number")))
        };
        match scheme {
            // The transport's listen-address grammar, less `vsock:PORT`: a
            // client must name the CID it connects to.
            "vsock" | "unix" | "tcp" => match s.parse::<ListenAddr>() {
                Ok(ListenAddr::Vsock { cid, port }) if rest.contains(':') => {
                    Ok(ConnectAddr::Vsock { cid, port })
                }
                Ok(ListenAddr::Unix(path)) => Ok(ConnectAddr::Unix(path)),
                Ok(ListenAddr::Tcp(hostport)) => Ok(ConnectAddr::Tcp(hostport)),
                Ok(_) => Err(bad("expected vsock:CID:PORT")),
                Err(e) => Err(e.replacen("listen address", "connect address", 1)),
            },
            "hybrid" => {
                let Some((path, port)) = rest.rsplit_once(':') else {
                    return Err(bad("expected hybrid:PATH:PORT"));
                };
                if path.is_empty() {
                    return Err(bad("empty path"));
                }
                Ok(ConnectAddr::Hybrid {
                    path: PathBuf::from(path),
                    port: number(port, "port")?,
                })
            }
            "exec" => {
                let words = shlex::split(rest).ok_or_else(|| bad("unbalanced quotes"))?;
                if words.is_empty() {
                    return Err(bad("empty command"));
                }
                Ok(ConnectAddr::Exec(words))
            }
            _ => Err(bad("unknown scheme")),
        }
    }
}

impl fmt::Display for ConnectAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectAddr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            ConnectAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ConnectAddr::Tcp(a) => write!(f, "tcp:{a}"),
            ConnectAddr::Hybrid { path, port } => write!(f, "hybrid:{}:{port}", path.display()),
            ConnectAddr::Exec(words) => {
                let joined = shlex::try_join(words.iter().map(String::as_str))
                    .unwrap_or_else(|_| words.join(" "));
                write!(f, "exec:{joined}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            "vsock:3:807".parse(),
            Ok(ConnectAddr::Vsock { cid: 3, port: 807 })
        );
        assert_eq!(
            "unix:/run/a.sock".parse(),
            Ok(ConnectAddr::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:80".parse(),
            Ok(ConnectAddr::Tcp("127.0.0.1:80".into()))
        );
        assert_eq!(
            "hybrid:/run/fc:v.sock:807".parse(),
            Ok(ConnectAddr::Hybrid {
                path: "/run/fc:v.sock".into(),
                port: 807
            })
        );
        assert_eq!(
            "exec:restore-agent --listen stdio --ticket-file 'my ticket'".parse(),
            Ok(ConnectAddr::Exec(vec![
                "restore-agent".into(),
                "--listen".into(),
                "stdio".into(),
                "--ticket-file".into(),
                "my ticket".into()
            ]))
        );
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "bogus:1",
            "vsock:807",
            "vsock:x:1",
            "unix:",
            "tcp:nohost",
            "tcp::1",
            "hybrid:/x",
            "hybrid::5",
            "hybrid:/x:y",
            "exec:",
            "exec:  ",
            "exec:'open",
        ] {
            assert!(s.parse::<ConnectAddr>().is_err(), "{s}");
        }
    }
}
