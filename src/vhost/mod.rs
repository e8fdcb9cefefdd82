//! vhost-user glue: the `VhostUserBackend` implementation (one worker thread per queue), the
//! listener loop serving one connection after another, quiesce/resume and lock hand-over.
//! The only module that uses the vhost and vhost-user-backend crates.
