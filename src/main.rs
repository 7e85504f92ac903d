//! Parse the command line, start telemetry, run, and map errors to exit codes:
//! 0 ok, 1 runtime failure, 2 configuration error.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use etcd_syncer::cli::{
    run_check, run_failback, run_mirror, run_promote, run_reset, run_status, run_zk2etcd,
    validate_config, AppError,
};
use etcd_syncer::config::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.telemetry.log_format;
    etcd_syncer::model::redact::set_enabled(cli.telemetry.redact_keys);
    etcd_syncer::telemetry::init(log_format, &cli.telemetry.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let cancel = CancellationToken::new();
        tokio::spawn(cancel_on_signal(cancel.clone()));
        match cli.command {
            Command::MirrorPlus(args) if args.validate_config => validate_config(*args),
            Command::MirrorPlus(args) => {
                let settings = args.clone().into_settings()?;
                run_mirror(settings, Some(*args), cancel).await
            }
            Command::SettingsTable => {
                use clap::CommandFactory;
                let command = etcd_syncer::config::Cli::command();
                let mirror = command
                    .find_subcommand("mirror-plus")
                    .expect("mirror-plus is a subcommand");
                print!("{}", etcd_syncer::config::table::reference(mirror));
                Ok(())
            }
            Command::Status(args) => run_status(*args).await,
            Command::Zk2etcd(args) => run_zk2etcd(*args, cancel).await,
            Command::Promote(args) => run_promote(*args).await,
            Command::Reset(args) => run_reset(*args).await,
            Command::Failback(args) => run_failback(*args, cancel).await,
            // Exit code 1 means "differences found", so any error is 2 here.
            Command::Check(args) => match run_check(*args).await {
                Ok(true) => Ok(()),
                Ok(false) => return Ok(ExitCode::from(1)),
                Err(error) => {
                    tracing::error!(error = %error, "Check failed.");
                    eprintln!("error: {error}");
                    return Ok(ExitCode::from(2));
                }
            },
        }
        .map(|()| ExitCode::SUCCESS)
    });
    match result {
        Ok(code) => code,
        Err(error) => report(error, log_format),
    }
}

fn report(error: AppError, log_format: LogFormat) -> ExitCode {
    let code = error.exit_code();
    if code == 2 {
        // A person reads this at the terminal; a collector reads the JSON line.
        match log_format {
            LogFormat::Json => tracing::error!(error = %error, "Invalid configuration."),
            LogFormat::Text => eprintln!("error: {error}"),
        }
    } else {
        tracing::error!(error = %error, "Exiting.");
    }
    ExitCode::from(code as u8)
}

/// SIGTERM (Kubernetes) and SIGINT (Ctrl-C) both stop cleanly.
async fn cancel_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("Cannot install signal handlers; stop with SIGKILL.");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "Shutting down."),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "Shutting down."),
    }
    cancel.cancel();
}
