//! An answer from a resolver checked against the query sent
//! (`check_answer`) and made the client's (`finish_answer`): the first
//! byte says where the query ends and the answer begins. Besides never
//! panicking: an answer that matched still matches once finished, and
//! carries the query's id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxyd::dns::message::id;
use tproxyd::dns::upstream::{check_answer, finish_answer, is_truncated, Check};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let rest = &rest[..rest.len().min(70_000)];
    let (query, answer) = rest.split_at((split as usize * 2).min(rest.len()));
    let check = check_answer(query, answer);
    let _ = is_truncated(answer);
    let mut finished = answer.to_vec();
    finish_answer(query, &mut finished);
    if check == Check::Match {
        assert_eq!(check_answer(query, &finished), Check::Match);
        assert_eq!(id(&finished), id(query));
    }
});
