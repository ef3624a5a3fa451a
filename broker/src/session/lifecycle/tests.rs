use super::*;

const WINDOW: Duration = Duration::from_secs(30);

fn parked_at(now: Instant) -> Lifecycle {
    let mut life = Lifecycle::new();
    assert_eq!(
        end_of_serving(DisconnectReason::ConnectionLost, true, false),
        None
    );
    life.park(now, WINDOW);
    life
}

#[test]
fn a_live_connection_takes_frames_until_a_close_is_asked_for() {
    let mut life = Lifecycle::new();
    assert!(life.takes_frames() && life.is_writable() && !life.is_parked());
    assert_eq!(life.stop(), None);
    assert!(life.request_close(DisconnectReason::Deleted));
    assert!(!life.takes_frames());
    // The first request wins.
    assert!(!life.request_close(DisconnectReason::SlowConsumer));
    assert_eq!(life.stop(), Some(Stop::Close(DisconnectReason::Deleted)));
    life.begin_closing();
    assert!(!life.takes_frames());
    assert!(!life.request_close(DisconnectReason::ServerShutdown));
    assert_eq!(life.stop(), None);
}

#[test]
fn a_lost_socket_parks_a_resumable_connection_and_ends_any_other() {
    let lost = || DisconnectReason::ConnectionLost;
    assert_eq!(end_of_serving(lost(), true, false), None);
    assert_eq!(end_of_serving(lost(), false, false), Some(lost()));
    assert_eq!(end_of_serving(lost(), true, true), Some(lost()));
    assert_eq!(
        end_of_serving(DisconnectReason::Superseded, true, false),
        None
    );
    assert_eq!(
        end_of_serving(DisconnectReason::Superseded, true, true),
        Some(DisconnectReason::ServerShutdown)
    );
    assert_eq!(
        end_of_serving(DisconnectReason::Deleted, true, false),
        Some(DisconnectReason::Deleted)
    );
}

#[test]
fn a_parked_connection_takes_frames_but_writes_none_and_expires_with_its_window() {
    let start = Instant::now();
    let mut life = parked_at(start);
    assert!(life.takes_frames() && life.is_parked() && !life.is_writable());
    assert_eq!(
        life.poll_parked(start),
        ParkStep::Wait {
            until: Some(start + WINDOW)
        }
    );
    assert_eq!(
        life.poll_parked(start + WINDOW),
        ParkStep::End {
            reason: DisconnectReason::ResumeExpired,
            refusal: Some(Refusal::Expired)
        }
    );
    assert!(!life.takes_frames());
    assert_eq!(life.claim(), Err(ClaimError::Closing));
}

#[test]
fn a_resume_attaches_to_a_parked_connection_and_serving_starts_with_its_bytes() {
    let start = Instant::now();
    let mut life = parked_at(start);
    life.claim().unwrap();
    life.attach(b"hello".to_vec()).unwrap();
    life.release();
    assert_eq!(
        life.poll_parked(start),
        ParkStep::Resumed(b"hello".to_vec())
    );
    assert!(life.is_writable() && !life.is_parked());
    // It can be lost and resumed again.
    life.park(start, WINDOW);
    assert!(life.is_parked());
}

#[test]
fn only_a_parked_connection_can_be_attached() {
    let mut life = Lifecycle::new();
    assert_eq!(life.attach(Vec::new()), Err(NotParked));
    life.begin_closing();
    assert_eq!(life.attach(Vec::new()), Err(NotParked));
}

#[test]
fn one_resume_at_a_time() {
    let mut life = parked_at(Instant::now());
    life.claim().unwrap();
    assert_eq!(life.claim(), Err(ClaimError::Claimed));
    life.release();
    life.claim().unwrap();
}

#[test]
fn a_delete_during_a_resume_waits_for_it_and_then_ends_the_connection() {
    let start = Instant::now();
    let mut life = parked_at(start);
    life.claim().unwrap();
    assert!(life.request_close(DisconnectReason::Deleted));
    // The resume's handshake runs on: nothing ends the connection under it.
    assert_eq!(life.poll_parked(start), ParkStep::Wait { until: None });
    // It failed (the client left): the DELETE takes effect.
    life.release();
    assert_eq!(
        life.poll_parked(start),
        ParkStep::End {
            reason: DisconnectReason::Deleted,
            refusal: None
        }
    );
}

#[test]
fn a_delete_during_a_resume_that_succeeds_is_acted_on_by_the_resumed_session() {
    let start = Instant::now();
    let mut life = parked_at(start);
    life.claim().unwrap();
    life.request_close(DisconnectReason::Deleted);
    life.attach(Vec::new()).unwrap();
    life.release();
    assert_eq!(life.poll_parked(start), ParkStep::Resumed(Vec::new()));
    assert_eq!(life.stop(), Some(Stop::Close(DisconnectReason::Deleted)));
}

#[test]
fn the_window_does_not_run_out_under_a_running_resume() {
    let start = Instant::now();
    let mut life = parked_at(start);
    life.claim().unwrap();
    let late = start + WINDOW + Duration::from_secs(5);
    assert_eq!(life.poll_parked(late), ParkStep::Wait { until: None });
    life.release();
    assert_eq!(
        life.poll_parked(late),
        ParkStep::End {
            reason: DisconnectReason::ResumeExpired,
            refusal: Some(Refusal::Expired)
        }
    );
}

#[test]
fn a_takeover_makes_the_live_session_let_go_and_park_for_the_resume() {
    let start = Instant::now();
    let mut life = Lifecycle::new();
    life.claim().unwrap();
    assert!(life.let_go());
    // Frames keep queueing while it lets go; a second takeover has nothing to do.
    assert!(life.takes_frames());
    assert!(!life.let_go());
    assert_eq!(life.stop(), Some(Stop::LetGo));
    let ended = end_of_serving(DisconnectReason::Superseded, true, false);
    assert_eq!(ended, None);
    life.park(start, WINDOW);
    assert!(life.is_parked());
    life.attach(b"x".to_vec()).unwrap();
    life.release();
    assert_eq!(life.poll_parked(start), ParkStep::Resumed(b"x".to_vec()));
    assert_eq!(life.stop(), None);
}

#[test]
fn a_takeover_of_a_socket_attached_but_not_yet_served_is_not_lost() {
    let start = Instant::now();
    let mut life = parked_at(start);
    life.claim().unwrap();
    life.attach(b"first".to_vec()).unwrap();
    life.release();
    // A second resume comes before the parked session has looked.
    life.claim().unwrap();
    assert!(life.let_go());
    assert_eq!(
        life.poll_parked(start),
        ParkStep::Resumed(b"first".to_vec())
    );
    assert_eq!(life.stop(), Some(Stop::LetGo));
}

#[test]
fn a_close_asked_for_before_a_takeover_is_acted_on_first() {
    let mut life = Lifecycle::new();
    life.claim().unwrap();
    life.request_close(DisconnectReason::SlowConsumer);
    life.let_go();
    assert_eq!(
        life.stop(),
        Some(Stop::Close(DisconnectReason::SlowConsumer))
    );
}

#[test]
fn an_overflow_while_parked_ends_it_and_tells_a_later_resume_why() {
    let start = Instant::now();
    let mut life = parked_at(start);
    assert!(life.request_close(DisconnectReason::SlowConsumer));
    assert_eq!(
        life.poll_parked(start),
        ParkStep::End {
            reason: DisconnectReason::SlowConsumer,
            refusal: Some(Refusal::Overflow)
        }
    );
    let mut life = parked_at(start);
    life.request_close(DisconnectReason::MaxDuration);
    assert_eq!(
        life.poll_parked(start),
        ParkStep::End {
            reason: DisconnectReason::MaxDuration,
            refusal: Some(Refusal::Expired)
        }
    );
}

#[test]
fn a_claim_sees_a_close_asked_for_before_it_and_the_close_stands() {
    // A move to another node checks this after claiming: the DELETE came first, so the
    // connection stays and is closed once the claim lets go.
    let start = Instant::now();
    let mut life = parked_at(start);
    life.request_close(DisconnectReason::Deleted);
    life.claim().unwrap();
    assert!(life.close_requested());
    life.release();
    assert_eq!(
        life.poll_parked(start),
        ParkStep::End {
            reason: DisconnectReason::Deleted,
            refusal: None
        }
    );
}

#[test]
fn each_end_is_closed_with_the_code_its_reason_calls_for() {
    assert_eq!(
        farewell(&DisconnectReason::ConnectionLost, Wire::WebSocket),
        None
    );
    let echoed = farewell(
        &DisconnectReason::ClientClosed(Some(4000), "bye".into()),
        Wire::WebSocket,
    );
    assert_eq!(
        echoed,
        Some(Farewell {
            code: 4000,
            reason: String::new(),
            abandon_queue: false
        })
    );
    let bare = farewell(
        &DisconnectReason::ClientClosed(None, String::new()),
        Wire::WebSocket,
    );
    assert_eq!(bare.map(|f| f.code), Some(close_code::NORMAL));
    let slow = farewell(&DisconnectReason::SlowConsumer, Wire::WebTransport).unwrap();
    assert_eq!(slow.code, DisconnectReason::SlowConsumer.status_code());
    assert!(slow.abandon_queue && !slow.reason.is_empty());
    let deleted = farewell(&DisconnectReason::Deleted, Wire::WebSocket).unwrap();
    assert_eq!(
        (deleted.code, deleted.reason, deleted.abandon_queue),
        (
            DisconnectReason::Deleted.status_code(),
            DisconnectReason::Deleted.description(),
            false
        )
    );
}

#[test]
fn time_limits_close_with_the_reason_that_ran_out_first() {
    let start = Instant::now();
    let idle = Duration::from_secs(10);
    let age = start + Duration::from_secs(60);
    assert_eq!(timed_out(start, age, start, idle), None);
    assert_eq!(
        timed_out(start + idle, age, start, idle),
        Some(DisconnectReason::IdleTimeout)
    );
    assert_eq!(
        timed_out(age, age, age, idle),
        Some(DisconnectReason::MaxDuration)
    );
}
