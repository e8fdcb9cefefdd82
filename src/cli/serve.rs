//! `insitu-blk serve`: the vhost-user-blk daemon's command line (owned by the vhost work, #5).

/// Arguments of `serve` (placeholder until the daemon lands).
#[derive(Debug, clap::Args)]
pub struct ServeArgs {}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("serve is not implemented yet")
}
