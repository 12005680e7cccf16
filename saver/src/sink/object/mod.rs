//! The object-store sink (`saver --sink s3://BUCKET/PREFIX/`, `gs://`, `az://`, `file:///DIR/`):
//! batches staged under the run, committed once the run is complete into a few large parts, a
//! manifest and `_SUCCESS` (see [`layout`] for the names, [`plan`] for the commit's rule).

// Wired into the saver by the next commits; the layout and the plan come first, tested alone.
#![allow(dead_code)]

pub(crate) mod layout;
pub(crate) mod plan;
