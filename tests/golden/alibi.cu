// Alibi: lowered from Rust by #[attention_variant]
struct Variant {
  static constexpr bool kSoftmax = true;
  static constexpr bool kHasQuery = false;
  static constexpr bool kHasKey = false;
  static constexpr bool kHasLogits = true;
  static constexpr bool kHasMask = false;
  static constexpr bool kHasOutput = false;
  static constexpr bool kHasSink = false;
  __device__ __forceinline__ static float logits(const Params& self, float s, const fi::Pos& at) {
    const float q_abs = fi::as_f32(fi::sub(fi::add(fi::as_i32(at.qo_pos), fi::as_i32(at.kv_len)), fi::as_i32(at.qo_len)));
    return fi::add(s, fi::mul(fi::index(self.slopes, self.slopes_len, at.qo_head), fi::sub(fi::as_f32(at.kv_pos), q_abs)));
  }
  __device__ __forceinline__ static float logits_pre(const Params& self) {
    return 1.0f;
  }
  __device__ __forceinline__ static float logits_post(const Params& self) {
    return 1.0f;
  }
  __device__ __forceinline__ static float logits_core(const Params& self, float s, const fi::Pos& at) {
    return logits(self, s, at);
  }
};
