//! `ctl deploy`: bring a Compose file up as a deployment, list, inspect,
//! follow its logs, take it down (docs/deployments.md).

use super::{Client, CtlError, printable};
use crate::protocol::operator::LogOptions;
use crate::protocol::{DeploymentInfo, DeploymentSummary, NetworkPolicy};
use reqwest::Method;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum DeployCmd {
    /// Create or converge a deployment from a Compose file: changed
    /// services are recreated, unchanged ones keep running, removed ones go.
    Up {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// The deployment's name (default: the file's `name:`).
        #[arg(long)]
        name: Option<String>,
        /// The node to run on (default: where it runs, or the least loaded).
        #[arg(long)]
        node: Option<String>,
        /// none, allowlist or restricted: narrows the node's default policy.
        #[arg(long, value_name = "POLICY")]
        network_policy: Option<NetworkPolicy>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List deployments.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// A deployment's services: state, health, restarts (JSON).
    Inspect { name: String },
    /// Its services' logs, each line prefixed by its service.
    Logs {
        name: String,
        /// Only this service.
        service: Option<String>,
        #[arg(short, long)]
        follow: bool,
        #[arg(long)]
        tail: Option<u64>,
        #[arg(short = 't', long)]
        timestamps: bool,
    },
    /// Remove every service and the network (and the volumes with --volumes).
    Down {
        name: String,
        #[arg(long)]
        volumes: bool,
    },
}

impl Client {
    pub async fn deploy_up(
        &self,
        compose: String,
        name: Option<String>,
        node: Option<String>,
        network_policy: Option<NetworkPolicy>,
    ) -> Result<DeploymentInfo, CtlError> {
        let body = serde_json::json!({
            "compose": compose,
            "name": name,
            "node_id": node,
            "network_policy": network_policy,
        });
        self.json(
            self.request(Method::POST, "/api/v1/deployments")
                .json(&body),
        )
        .await
    }

    pub async fn deployments(&self) -> Result<Vec<DeploymentSummary>, CtlError> {
        #[derive(serde::Deserialize)]
        struct R {
            deployments: Vec<DeploymentSummary>,
        }
        Ok(self
            .json::<R>(self.request(Method::GET, "/api/v1/deployments"))
            .await?
            .deployments)
    }

    pub async fn deployment(&self, name: &str) -> Result<DeploymentInfo, CtlError> {
        self.json(self.request(Method::GET, &format!("/api/v1/deployments/{name}")))
            .await
    }

    pub async fn deploy_down(&self, name: &str, volumes: bool) -> Result<(), CtlError> {
        let path = format!("/api/v1/deployments/{name}?volumes={volumes}");
        self.json::<serde_json::Value>(self.request(Method::DELETE, &path))
            .await
            .map(|_| ())
    }
}

/// The table `deploy up` and `deploy inspect` print.
pub fn format_deployment(d: &DeploymentInfo) -> String {
    // What a node reports is printed as text only (`printable`).
    let mut out = format!(
        "deployment {} on node {} (network {})\n",
        printable(&d.deployment),
        printable(&d.node_id),
        printable(&d.network)
    );
    let _ = writeln!(
        out,
        "{:<16} {:<28} {:<10} {:<10} {:>8}  ACTION",
        "SERVICE", "WORKER", "STATE", "HEALTH", "RESTARTS"
    );
    for s in &d.services {
        let _ = writeln!(
            out,
            "{:<16} {:<28} {:<10} {:<10} {:>8}  {}",
            printable(s.worker.service.as_deref().unwrap_or("?")),
            printable(&s.worker.worker_id),
            s.worker.state.as_str(),
            printable(s.health.as_deref().unwrap_or("-")),
            s.restarts,
            s.action
                .map(|a| format!("{a:?}").to_lowercase())
                .unwrap_or_default(),
        );
    }
    for r in &d.removed {
        let _ = writeln!(out, "{:<16} removed", printable(r));
    }
    out
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializes"));
}

/// Runs a `deploy` subcommand.
pub async fn run(client: &Client, cmd: DeployCmd) -> Result<(), CtlError> {
    match cmd {
        DeployCmd::Up {
            file,
            name,
            node,
            network_policy,
            json,
        } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| CtlError::Local(format!("{}: {e}", file.display())))?;
            let d = client.deploy_up(text, name, node, network_policy).await?;
            if json {
                print_json(&d);
            } else {
                print!("{}", format_deployment(&d));
            }
        }
        DeployCmd::Ls { json } => {
            let list = client.deployments().await?;
            if json {
                print_json(&list);
            } else {
                println!(
                    "{:<24} {:<20} {:>8} {:>8}",
                    "NAME", "NODE", "SERVICES", "RUNNING"
                );
                for d in list {
                    println!(
                        "{:<24} {:<20} {:>8} {:>8}",
                        printable(&d.deployment),
                        printable(&d.node_id),
                        d.services,
                        d.running
                    );
                }
            }
        }
        DeployCmd::Inspect { name } => print_json(&client.deployment(&name).await?),
        DeployCmd::Logs {
            name,
            service,
            follow,
            tail,
            timestamps,
        } => {
            let d = client.deployment(&name).await?;
            let services: Vec<String> = d
                .services
                .iter()
                .filter_map(|s| s.worker.service.clone())
                // A service name becomes part of a URL: only a name a
                // deployment can have (a node could report anything).
                .filter(|s| crate::protocol::valid_name(s, crate::protocol::MAX_SERVICE_NAME))
                .filter(|s| service.as_ref().is_none_or(|want| want == s))
                .collect();
            if services.is_empty() {
                return Err(CtlError::Local(format!(
                    "deployment {name} has no service {}",
                    service.unwrap_or_default()
                )));
            }
            let width = services.iter().map(String::len).max().unwrap_or(0);
            let opts = LogOptions {
                follow,
                since: None,
                tail,
                timestamps,
            };
            let all = services.iter().map(|s| {
                let worker = crate::protocol::service_worker_id(&name, s);
                let prefix = format!("{s:<width$} | ");
                let opts = opts.clone();
                async move { super::logs::logs_as(client, &worker, opts, Some(prefix)).await }
            });
            for r in futures_util::future::join_all(all).await {
                r?;
            }
        }
        DeployCmd::Down { name, volumes } => {
            client.deploy_down(&name, volumes).await?;
            println!("{name}");
        }
    }
    Ok(())
}
