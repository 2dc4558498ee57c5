//! `ctl org` and `ctl token`: organizations, their registration keys and
//! operator tokens (docs/organizations.md). Making and revoking them takes
//! the server's admin token.

use super::{Client, CtlError};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

#[derive(clap::Subcommand)]
pub enum OrgCmd {
    /// Create an organization; prints its first registration key (shown
    /// once): nodes that register with it belong to the organization.
    Create { name: String },
    /// List organizations (an organization's token sees only its own).
    Ls,
    /// Make another registration key for an organization (shown once).
    Key { name: String },
    /// Remove an organization with its keys and tokens (refused while a
    /// node belongs to it).
    Rm { name: String },
}

#[derive(clap::Subcommand)]
pub enum TokenCmd {
    /// Create an operator token of an organization (printed once): it sees
    /// and schedules only that organization's nodes and workers. An
    /// organization's operator makes tokens of its own organization (--org
    /// may be left out), none outliving its own token.
    Create {
        #[arg(long)]
        org: Option<String>,
        /// Refused after this long (e.g. 12h, 30d); default: until revoked.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// List operator tokens (not their secrets).
    Ls,
    /// Revoke an operator token at once.
    Revoke { id: String },
}

fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

pub async fn run_org(client: &Client, cmd: OrgCmd) -> Result<(), CtlError> {
    match cmd {
        OrgCmd::Create { name } => {
            let o: Value = client
                .json(
                    client
                        .request(Method::POST, "/api/v1/orgs")
                        .json(&json!({ "name": name })),
                )
                .await?;
            let key = &o["registration_key"];
            eprintln!(
                "organization {name}: registration key {} (shown once; agents take it as --psk)",
                str_of(key, "id")
            );
            println!("{}", str_of(key, "secret"));
        }
        OrgCmd::Ls => {
            let orgs: Vec<Value> = client
                .json(client.request(Method::GET, "/api/v1/orgs"))
                .await?;
            for o in orgs {
                println!(
                    "{}\t{}",
                    str_of(&o, "name"),
                    o["created_at"].as_str().unwrap_or("-")
                );
            }
        }
        OrgCmd::Rm { name } => {
            client
                .send(client.request(Method::DELETE, &format!("/api/v1/orgs/{name}")))
                .await?;
            println!("{name}");
        }
        OrgCmd::Key { name } => {
            let k: Value = client
                .json(client.request(Method::POST, &format!("/api/v1/orgs/{name}/keys")))
                .await?;
            eprintln!(
                "registration key {} of {name} (shown once)",
                str_of(&k, "id")
            );
            println!("{}", str_of(&k, "secret"));
        }
    }
    Ok(())
}

pub async fn run_token(client: &Client, cmd: TokenCmd) -> Result<(), CtlError> {
    match cmd {
        TokenCmd::Create { org, expires } => {
            if expires.is_some_and(|d| d.as_secs() == 0) {
                return Err(CtlError::Local("--expires must be at least 1s".into()));
            }
            let body = json!({ "org": org, "expires_in_secs": expires.map(|d| d.as_secs()) });
            let t: Value = client
                .json(client.request(Method::POST, "/api/v1/tokens").json(&body))
                .await?;
            eprintln!(
                "operator token {} of {}{} (shown once; revoke with `tether ctl token revoke {}`)",
                str_of(&t, "id"),
                str_of(&t, "org"),
                t["expires_at"]
                    .as_str()
                    .map(|e| format!(", expires {e}"))
                    .unwrap_or_default(),
                str_of(&t, "id"),
            );
            println!("{}", str_of(&t, "token"));
        }
        TokenCmd::Ls => {
            let tokens: Vec<Value> = client
                .json(client.request(Method::GET, "/api/v1/tokens"))
                .await?;
            for t in tokens {
                println!(
                    "{}\t{}\t{}\texpires={}",
                    str_of(&t, "id"),
                    str_of(&t, "org"),
                    str_of(&t, "created_at"),
                    t["expires_at"].as_str().unwrap_or("never"),
                );
            }
        }
        TokenCmd::Revoke { id } => {
            client
                .send(client.request(Method::DELETE, &format!("/api/v1/tokens/{id}")))
                .await?;
            println!("{id}");
        }
    }
    Ok(())
}
