//! The SSH transport: a small API over russh that every other part of arbor uses.
//!
//! - [`connect`]: TCP with a timeout, host key verification ([`known_hosts`]), and
//!   authentication ([`auth`]: agent, key files, URL password, prompts).
//! - [`Session::exec`]: streamed stdout/stderr, stdin, exit status ([`exec`]).
//! - [`Session::sftp`]: pipelined atomic uploads ([`sftp`]).
//! - [`Session::forward_unix`] / [`Session::forward_tcp_loopback`]: remote forwards whose
//!   connections go to a caller's [`Connector`] ([`forward`]).
//! - Agent forwarding: [`ExecOptions::forward_agent`] plus [`Session::set_agent_connector`].
//!
//! Every error is an [`SshError`] naming the host, the step and the cause.

pub mod agent;
pub mod agent_front;
pub mod auth;
pub mod error;
pub mod exec;
pub mod forward;
pub mod known_hosts;
pub mod prompt;
pub mod session;
pub mod sftp;
pub mod ssh_config;
pub mod tcp_info;

pub use auth::{
    AgentSource, AuthOptions, Prompter, agent_socket, set_agent_socket, take_agent_socket,
};
pub use error::{Cause, SshError, Step};
pub use exec::{
    Collected, CommandLine, ExecOptions, ExitStatus, Output, RemoteCommand, shell_quote,
};
pub use forward::{Connector, ForwardEnd, ForwardedStream};
pub use prompt::TerminalPrompter;
pub use session::{
    ConnectOptions, HostKeyOptions, HostKeyPolicy, Session, Target, TargetUrl, connect,
    connect_through, connect_via, local_user,
};
pub use sftp::{Sftp, Uploaded};
pub use tcp_info::LinkInfo;
