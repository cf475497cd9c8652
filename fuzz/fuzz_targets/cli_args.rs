//! Arbitrary command lines (the input split at NUL bytes, so arguments may be any bytes,
//! including invalid UTF-8) through the CLI parser and what the binary does next with a
//! parsed command before any I/O: `run`'s checks across flags, and a client command's request,
//! which must encode and decode back to itself.
#![no_main]

use std::{ffi::OsString, os::unix::ffi::OsStringExt};

use balancer::{
    cli::{Cli, Command},
    control::protocol::{decode_request, encode_request},
};
use clap::Parser;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let args = std::iter::once(OsString::from("balancer")).chain(
        data.split(|&b| b == 0)
            .map(|a| OsString::from_vec(a.to_vec())),
    );
    let Ok(cli) = Cli::try_parse_from(args) else {
        return;
    };
    match cli.command {
        Command::Run(args) => {
            let _ = args.check();
        }
        command => {
            if let Some((_, request)) = command.control_request() {
                // A request the CLI cannot encode is refused with a message, not a panic.
                if let Ok(payload) = encode_request(&request) {
                    let back = decode_request(&payload).expect("an encoded request decodes");
                    assert_eq!(back, request, "round trip");
                }
            }
        }
    }
});
