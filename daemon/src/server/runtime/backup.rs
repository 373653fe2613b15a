//! The `backup` request (admin): a hot backup taken on a thread of its own, since copying
//! files blocks, while every shard goes on serving; the answer is delivered when it is done
//! ([`crate::store::backup`]).

use std::rc::Rc;
use std::sync::mpsc::TryRecvError;
use std::sync::Arc;
use std::time::Duration;

use indicia_proto::{ErrorCode, Response};

use super::{deliver, unix_now, ReplyTo, Shard};
use crate::store::backup::BackupError;

/// How often the shard looks whether the backup thread has finished.
const POLL: Duration = Duration::from_millis(20);

pub(super) fn backup_request(shard: &Rc<Shard>, out: String, reply: ReplyTo) {
    let control = Arc::clone(&shard.control);
    if let Err(err) = control.backup().claim() {
        deliver(shard, vec![(reply, refusal(&err))]);
        return;
    }
    // Each shard's durable point now: what the copy holds (records after it may be on
    // their way to the disk while the files are copied; the copy is cut at this point).
    let durable: Vec<u64> = (0..shard.shards)
        .map(|index| control.durable(index))
        .collect();
    let taken_unix = unix_now();
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("indicia-backup".into())
        .spawn(move || {
            let outcome = control
                .backup()
                .take(std::path::Path::new(&out), &durable, taken_unix);
            let _ = tx.send(outcome);
        });
    if let Err(err) = spawned {
        // The thread never ran: the slot it claimed is free again.
        shard.control.backup().release();
        let failed = Response::error(
            ErrorCode::Internal,
            format!("cannot start the backup thread: {err}"),
        );
        deliver(shard, vec![(reply, failed)]);
        return;
    }
    let shard = Rc::clone(shard);
    glommio::spawn_local(async move {
        let response = loop {
            match rx.try_recv() {
                Ok(Ok(report)) => {
                    tracing::info!(
                        shards = report.shards.len(),
                        clean = report.clean,
                        "backup taken"
                    );
                    break Response::Backup(report);
                }
                Ok(Err(err)) => {
                    tracing::error!("backup failed: {err}");
                    break refusal(&err);
                }
                Err(TryRecvError::Empty) => glommio::timer::sleep(POLL).await,
                Err(TryRecvError::Disconnected) => {
                    break Response::error(ErrorCode::Internal, "the backup thread stopped");
                }
            }
        };
        deliver(&shard, vec![(reply, response)]);
    })
    .detach();
}

fn refusal(err: &BackupError) -> Response {
    let code = match err {
        BackupError::NotAbsolute(_) | BackupError::NotEmpty(_) | BackupError::InsideDataDir(_) => {
            ErrorCode::InvalidArgument
        }
        BackupError::Running => ErrorCode::Busy,
        _ => ErrorCode::Internal,
    };
    Response::error(code, format!("backup: {err}"))
}
