// A validated batch cannot be edited after its checks: the fields are private.
use ferrinfer::prelude::*;

fn main() {
    let heads = Heads::new(2, 1, 8).unwrap();
    let kv = KvIndex::ragged(&[0, 4], KvLayout::Nhd).unwrap();
    let mut batch = Batch::new(heads, &[0, 1], kv).unwrap();
    batch.qo_indptr = vec![0, 1 << 30];
    let mut kv = batch.kv().clone();
    kv.indices[0] = -1;
}
