//! restore-client: the host-side command line tool for restore-agent.
//!
//! Commands are grouped by module: `store` works on a local datastore
//! directory; `remote` and `extract` talk to an agent through the client
//! library (`restore_agent::client`). Every command yields an [`Outcome`]:
//! a JSON document (printed with `--output json`) and a human text.
//! Exit codes: 0 success, 1 the agent (or the store) reported an error,
//! 2 usage, connection or local failure.

mod archive_check;
mod extract;
mod fmt;
mod meta;
mod newfile;
mod remote;
mod sparse;
mod sparsemap;
mod store;
mod tarframe;
mod untar;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use restore_agent::client::{ClientError, ConnectAddr, ConnectOptions, Session};

#[derive(Parser, Debug)]
#[command(
    name = "restore-client",
    version,
    about = "Host-side client for restore-agent: browse and restore files from backups",
    after_help = "Exit codes: 0 success, 1 the agent reported an error, 2 usage, connection or local failure."
)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command accepts, before or after the subcommand.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Agent address: vsock:CID:PORT, unix:PATH, tcp:HOST:PORT, hybrid:PATH:PORT or exec:COMMAND
    /// (default: the RESTORE_AGENT_CONNECT environment variable, unless --vm is given)
    #[arg(long, global = true, value_name = "ADDR")]
    connect: Option<String>,
    /// File holding the agent's ticket (default: the RESTORE_AGENT_TICKET environment variable)
    #[arg(long, global = true, value_name = "PATH")]
    ticket_file: Option<PathBuf>,
    /// Connect to the running VM NAME (started with `vm start`): its address and ticket
    #[arg(long, global = true, value_name = "NAME")]
    vm: Option<String>,
    /// Output format: aligned text for people, or one JSON document on stdout
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
    /// Seconds to wait for the connection (hybrid: keep retrying until then)
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10.0)]
    connect_timeout: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[value(alias = "text")]
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Call any method; PARAMS_JSON is an object or array; prints the raw result
    Call {
        method: String,
        #[arg(value_name = "PARAMS_JSON")]
        params: Option<String>,
    },
    /// Show the agent's status
    Status,
    /// Ask the agent to shut down
    Stop,
    /// Check that the agent answers
    Ping,
    /// List the snapshots the agent serves
    Snapshots {
        /// Only this namespace (e.g. prod/sub); default: every namespace
        #[arg(long)]
        namespace: Option<String>,
    },
    /// List the archives of a snapshot
    Archives { snapshot: String },
    /// List the volumes (partitions, filesystems) of a disk image archive
    Volumes { snapshot: String, archive: String },
    /// List a directory in a volume
    Ls {
        /// Long listing, like `ls -l`
        #[arg(short = 'l')]
        long: bool,
        /// Recurse into subdirectories
        #[arg(short = 'R')]
        recursive: bool,
        #[command(flatten)]
        file: remote::FileArgs,
    },
    /// Show one entry's metadata
    Stat {
        /// Follow symlinks (within the volume)
        #[arg(short = 'L', long)]
        follow: bool,
        /// Also show extended attributes (as getfattr: text in quotes,
        /// other values as 0x hex)
        #[arg(short = 'x', long)]
        xattrs: bool,
        #[command(flatten)]
        file: remote::FileArgs,
    },
    /// Write a file's contents to stdout
    Cat {
        #[command(flatten)]
        file: remote::FileArgs,
    },
    /// Restore a file or directory tree into a directory, a tar or zip file, or stdout (`-`, tar)
    Extract(extract::ExtractArgs),
    /// Write a blob archive of a snapshot to stdout (e.g. qemu-server.conf.blob, the VM's configuration)
    Blob { snapshot: String, archive: String },
    /// Work on a local datastore directory
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Start, list and stop file-restore VMs
    #[command(subcommand)]
    Vm(restore_agent::vm::VmCommand),
    /// Print a shell completion script
    Completions {
        #[arg(value_parser = ["bash", "zsh", "fish"])]
        shell: String,
    },
    /// Print the manual page (roff), or with --dir write it and one page per
    /// subcommand (restore-client-ls.1, restore-client-vm-start.1, ...) there
    Manpage {
        /// Directory to write every page into (made if missing)
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// What a command produced: its JSON report, its human text (printed if not
/// empty), and problems found (on stderr; they make the exit code 1).
pub struct Outcome {
    pub json: serde_json::Value,
    pub text: String,
    pub problems: Vec<String>,
}

impl Outcome {
    pub fn new(json: serde_json::Value, text: impl Into<String>) -> Self {
        Outcome {
            json,
            text: text.into(),
            problems: Vec::new(),
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            if !e.use_stderr() {
                // --help, --version
                return ExitCode::SUCCESS;
            }
            if json_asked() {
                // the error's lines, before the usage that follows them
                let text = e.render().to_string();
                let message: Vec<&str> = text
                    .lines()
                    .take_while(|l| !l.trim().is_empty())
                    .map(str::trim)
                    .collect();
                let message = message.join(" ");
                let message = message.trim_start_matches("error: ");
                let report = ClientError::local(message).to_json();
                let _ = try_write_stdout(format!("{report}\n").as_bytes());
            }
            return ExitCode::from(2);
        }
    };
    let output = cli.global.output;
    if let Command::Vm(cmd) = cli.command {
        let mut out = String::new();
        let code = restore_agent::vm::run(cmd, output == OutputFormat::Json, &mut out);
        if code == 0 {
            write_stdout(out.as_bytes());
        } else {
            // As for any failed command: its status stands.
            let _ = try_write_stdout(out.as_bytes());
        }
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let result = run(cli);
    match result {
        Ok(outcome) => {
            match output {
                OutputFormat::Json if !outcome.json.is_null() => {
                    write_stdout(format!("{}\n", outcome.json).as_bytes())
                }
                OutputFormat::Json => {}
                OutputFormat::Human if !outcome.text.is_empty() => {
                    write_stdout(format!("{}\n", outcome.text).as_bytes())
                }
                OutputFormat::Human => {}
            }
            for p in &outcome.problems {
                eprintln!(
                    "restore-client: {}",
                    fmt::printable(&fmt::shortened(p, MESSAGE_SHOWN))
                );
            }
            if outcome.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            let message = e.to_string();
            let message = fmt::shortened(&message, MESSAGE_SHOWN);
            eprintln!("restore-client: error: {}", fmt::printable(&message));
            if output == OutputFormat::Json {
                // The failure's own exit code stands, whether or not its
                // report could be written.
                let _ = try_write_stdout(format!("{}\n", e.to_json()).as_bytes());
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// Bytes of an error message shown on stderr (`--output json` keeps it
/// whole, for scripts).
const MESSAGE_SHOWN: usize = 4096;

/// Whether the command line asks for `--output json`, for a usage error
/// that clap found before it could say.
fn json_asked() -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    args.iter().enumerate().any(|(i, a)| {
        a == "--output=json" || (a == "--output" && args.get(i + 1).is_some_and(|v| v == "json"))
    })
}

/// Writes a successful command's report to stdout (see [`stdout_error`]
/// for failures).
pub(crate) fn write_stdout(bytes: &[u8]) {
    if let Err(e) = try_write_stdout(bytes) {
        let e = stdout_error(e);
        eprintln!("restore-client: error: {e}");
        std::process::exit(i32::from(e.exit_code()));
    }
}

fn try_write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes).and_then(|()| stdout.flush())
}

/// The error for a failed write to stdout. When stdout's reader has gone
/// (`restore-client ls -R ... | head`) the command ends here, quietly and
/// with status 0: what a Unix tool killed by SIGPIPE does, without the
/// signal itself, which would also kill the client on a broken connection
/// to the agent instead of reporting it.
pub(crate) fn stdout_error(e: std::io::Error) -> ClientError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    ClientError::local(format!("writing to stdout: {e}"))
}

fn run(cli: Cli) -> Result<Outcome, ClientError> {
    let global = cli.global;
    match cli.command {
        Command::Store(cmd) => store::run_store(cmd).map_err(|e| ClientError::Store {
            code: e.kind.code(),
            message: e.message,
        }),
        Command::Vm(_) => Err(ClientError::local("internal: `vm` reached run()")),
        Command::Completions { shell } => {
            let shell = match shell.as_str() {
                "zsh" => clap_complete::Shell::Zsh,
                "fish" => clap_complete::Shell::Fish,
                _ => clap_complete::Shell::Bash,
            };
            // Into memory first: clap_complete panics when a write fails.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "restore-client", &mut script);
            if shell == clap_complete::Shell::Bash {
                script = bash_case_labels_fixed(&script);
            }
            write_stdout(&script);
            Ok(Outcome::new(serde_json::Value::Null, ""))
        }
        Command::Manpage { dir } => {
            // The pages name no `help` subcommand: it has no page.
            let cmd = Cli::command().disable_help_subcommand(true);
            if let Some(dir) = dir {
                std::fs::create_dir_all(&dir)
                    .and_then(|()| clap_mangen::generate_to(cmd, &dir))
                    .map_err(|e| {
                        ClientError::local(format!(
                            "writing manual pages to {}: {e}",
                            dir.display()
                        ))
                    })?;
                return Ok(Outcome::new(serde_json::Value::Null, ""));
            }
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .map_err(|e| ClientError::local(format!("writing the manual page: {e}")))?;
            write_stdout(&page);
            Ok(Outcome::new(serde_json::Value::Null, ""))
        }
        command => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| ClientError::local(format!("starting the async runtime: {e}")))?;
            runtime.block_on(async move {
                let session = connect(&global).await?;
                let result = remote::run(&session, command, &global).await;
                let closed = session.close().await;
                let outcome = result?;
                closed?;
                Ok(outcome)
            })
        }
    }
}

/// clap_complete (4.6) spells the bash script's case labels of subcommands
/// of a hyphenated binary `restore__subcmd__client__subcmd__ls` while its
/// dispatch loop builds `restore__client__subcmd__ls`, so nothing completes
/// after a subcommand (clap-rs/clap#6421); the labels are respelled as the
/// loop builds them.
fn bash_case_labels_fixed(script: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(script)
        .replace("restore__subcmd__client", "restore__client")
        .into_bytes()
}

/// Connects and authenticates as the global options say.
async fn connect(global: &Global) -> Result<Session, ClientError> {
    let mut global = global.clone();
    if let Some(name) = &global.vm {
        if global.connect.is_some() {
            return Err(ClientError::local(
                "give either --vm or --connect, not both",
            ));
        }
        let (addr, ticket_file) = restore_agent::vm::resolve(name).map_err(ClientError::Local)?;
        global.connect = Some(addr);
        global.ticket_file.get_or_insert(ticket_file);
    }
    // the environment's address stands in for --connect, not for --vm
    if global.connect.is_none() {
        global.connect = std::env::var("RESTORE_AGENT_CONNECT")
            .ok()
            .filter(|a| !a.is_empty());
    }
    let Some(addr) = &global.connect else {
        return Err(ClientError::local(
            "no agent address: give --connect ADDR or --vm NAME (or set RESTORE_AGENT_CONNECT)",
        ));
    };
    let addr: ConnectAddr = addr.parse().map_err(ClientError::Local)?;
    let ticket = ticket(&global)?;
    if !(global.connect_timeout.is_finite() && global.connect_timeout > 0.0) {
        return Err(ClientError::local(
            "--connect-timeout must be a positive number",
        ));
    }
    let opts = ConnectOptions {
        connect_timeout: Duration::from_secs_f64(global.connect_timeout.min(86_400.0)),
        ..ConnectOptions::default()
    };
    Session::connect(&addr, &ticket, &opts).await
}

/// The ticket from `--ticket-file` (one trailing newline removed) or from the
/// environment.
fn ticket(global: &Global) -> Result<String, ClientError> {
    if let Some(path) = &global.ticket_file {
        let mut t = std::fs::read_to_string(path).map_err(|e| {
            ClientError::local(format!("cannot read ticket file {}: {e}", path.display()))
        })?;
        if t.ends_with('\n') {
            t.pop();
        }
        if t.is_empty() {
            return Err(ClientError::local(format!(
                "ticket file {} is empty",
                path.display()
            )));
        }
        return Ok(t);
    }
    match std::env::var("RESTORE_AGENT_TICKET") {
        Ok(t) if !t.is_empty() => Ok(t),
        _ => Err(ClientError::local(
            "no ticket: give --ticket-file PATH or set RESTORE_AGENT_TICKET",
        )),
    }
}
