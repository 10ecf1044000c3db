// Adapter-tuning, prefix-tuning and ladder side-tuning on a causal language model
// (models/lm_methods.hpp, attached to the tiny Llama checkpoint): gradients of every tensor
// against central differences of causal_lm_loss in double, decoding with a cache against the full
// forward, saving and loading, and bad input.
#include <lora/loss.hpp>
#include <lora/models/generate.hpp>
#include <lora/models/llama.hpp>

#include "lm_test_util.hpp"
#include "test_util.hpp"

#include <filesystem>

namespace fs = std::filesystem;
using Ids = lora::Mat<std::int64_t>;
using Model = lora::LlamaModel<double>;

namespace {

const std::string kLlama = data_path("models/tiny_llama");

// Every tensor of the methods set to small random values (a new bottleneck's up and a new side
// network's U are zero, which would leave the tensors before them without gradients).
void randomise(Model& model, std::uint64_t seed) {
  for (auto& p : model.parameters()) p.value = random_uniform(p.value.rows(), p.value.cols(), ++seed, 0.3);
}

// forward_train's loss is forward's, and backward's gradient of every trainable tensor is the
// central difference; returns how many were checked.
int check_gradients(Model& model) {
  const lm_test::Batch b = lm_test::padded_batch();
  auto loss = [&] { return lora::causal_lm_loss<double>(model.forward(b.ids, b.mask), b.labels).loss; };
  model.zero_grad();
  const auto r = lora::causal_lm_loss<double>(model.forward_train(b.ids, b.mask), b.labels);
  EXPECT_NEAR(r.loss, loss(), 1e-12);
  model.backward(r.grad);
  EXPECT_LORA_ERROR(model.backward(r.grad), "no forward_train");
  lora::Index count = 0;
  for (auto& p : model.parameters()) count += p.value.size();
  EXPECT_EQ(count, model.trainable_parameters());
  return expect_parameter_gradients(model.parameters(), loss, 1e-7);
}

void check_incremental(const Model& model) { lm_test::expect_incremental_equals_full(model); }

lora::BottleneckConfig bottleneck(lora::Index size) {
  lora::BottleneckConfig c;
  c.size = size;
  c.seed = 5;
  return c;
}
lora::PrefixConfig prefix(lora::Index length, lora::Index projection = 0) {
  lora::PrefixConfig c;
  c.length = length;
  c.projection = projection;
  c.seed = 6;
  return c;
}

}  // namespace

// Bottlenecks after both halves of every layer and a prefix, trained together: a new bottleneck
// is the identity; every gradient matches; decoding with a cache (which starts with the prefix)
// equals the full forward.
TEST(LmMethods, BottleneckAndPrefixGradientsMatchFiniteDifferences) {
  Model model(kLlama);
  const lm_test::Batch b = lm_test::padded_batch();
  const lora::Mat<double> base = model.forward(b.ids, b.mask);
  model.add_bottlenecks(bottleneck(3));
  EXPECT_EQ(model.forward(b.ids, b.mask), base);  // up = 0
  EXPECT_EQ(model.trainable_parameters(), 2 * 2 * (3 * 32 + 3 + 32 * 3 + 32));
  model.add_prefix(prefix(2));
  EXPECT_EQ(model.methods().prefix_length(), 2);
  EXPECT_GT((model.forward(b.ids, b.mask) - base).cwiseAbs().maxCoeff(), 1e-3);  // the prefix is seen
  randomise(model, 10);
  EXPECT_EQ(check_gradients(model), 2 * 2 * 227 + 2 * 2 * 2 * 16);
  check_incremental(model);
}

// The prefix's reparameterising MLP (prefix.hpp) trains through the model; folding it keeps the
// logits and leaves the table alone.
TEST(LmMethods, ReparameterisedPrefixGradientsMatchAndFold) {
  Model model(kLlama);
  model.add_prefix(prefix(3, 5));
  randomise(model, 20);
  EXPECT_EQ(check_gradients(model), 2 * (3 * 16 + 5 * 16 + 5 + 32 * 5 + 32));
  const lm_test::Batch b = lm_test::padded_batch();
  const lora::Mat<double> before = model.forward(b.ids, b.mask);
  model.methods().fold_prefix();
  EXPECT_LE((model.forward(b.ids, b.mask) - before).cwiseAbs().maxCoeff(), 1e-12);
  EXPECT_EQ(model.trainable_parameters(), 2 * 3 * 32);
  check_incremental(model);
}

// LoRA on every linear (the tiny checkpoint's adapter), a prefix and bottlenecks train together:
// every LoRA factor's and every method's gradient matches; merging the LoRA layers leaves the
// logits (the prefix and bottlenecks stay as they are).
TEST(LmMethods, LoraPrefixAndBottlenecksTrainTogether) {
  const auto peft = lora::PeftConfig::read(kLlama + "/adapter/adapter_config.json");
  Model model(kLlama, &peft);
  lora::load_adapter(kLlama + "/adapter", model.modules());
  model.add_prefix(prefix(2));
  model.add_bottlenecks(bottleneck(2), false, true);
  randomise(model, 50);
  const lora::Index lora_count = model.modules().trainable_parameters();
  EXPECT_GT(lora_count, 0);
  EXPECT_EQ(check_gradients(model), lora_count + 2 * 2 * 2 * 16 + 2 * (2 * 32 + 2 + 32 * 2 + 32));
  const lm_test::Batch b = lm_test::padded_batch();
  const lora::Mat<double> unmerged = model.forward(b.ids, b.mask);
  model.modules().merge();
  EXPECT_LE((model.forward(b.ids, b.mask) - unmerged).cwiseAbs().maxCoeff(), 1e-12);
  check_incremental(model);
}

// A ladder side network: a new one leaves the logits as they are; its gradients match without
// any backward through the layers; decoding with a cache (taps cached, the side network run over
// every token so far) equals the full forward; generation runs.
TEST(LmMethods, LadderGradientsMatchFiniteDifferencesAndDecodeWithACache) {
  Model model(kLlama);
  const lm_test::Batch b = lm_test::padded_batch();
  const lora::Mat<double> base = model.forward(b.ids, b.mask);
  lora::LadderConfig lc;
  lc.reduction = 4;
  lc.heads = 2;
  lc.seed = 3;
  model.add_ladder(lc);
  EXPECT_LE((model.forward(b.ids, b.mask) - base).cwiseAbs().maxCoeff(), 1e-14);  // U = 0, c = 0
  randomise(model, 30);
  EXPECT_GT((model.forward(b.ids, b.mask) - base).cwiseAbs().maxCoeff(), 1e-3);
  const int checked = check_gradients(model);
  EXPECT_EQ(checked, model.methods().ladder()->parameter_count());
  check_incremental(model);
  // The side network is causal: a later token does not change an earlier row.
  Ids other = b.ids;
  other(1, 5) = 40;
  EXPECT_LE((model.forward(other, b.mask).topRows(11) - model.forward(b.ids, b.mask).topRows(11)).cwiseAbs().maxCoeff(), 1e-14);
  lora::GenerationConfig g;
  g.max_new_tokens = 4;
  const auto out = lora::generate(model, {{5, 9, 2}}, g);
  Ids row(1, 3);
  row << 5, 9, 2;
  Eigen::Index best;
  model.forward(row).row(2).maxCoeff(&best);
  EXPECT_EQ(out[0][0], best);
}

// The methods' tensors save to one safetensors file and load into a model with the same methods
// (other seeds), which then gives the same logits; a file of another shape is refused whole.
TEST(LmMethods, SaveAndLoadTheMethodsTensors) {
  const lm_test::Batch b = lm_test::padded_batch();
  const std::string file = (fs::temp_directory_path() / "lora_test_lm_methods.safetensors").string();
  Model trained(kLlama);
  trained.add_bottlenecks(bottleneck(3), true, false);
  trained.add_prefix(prefix(2));
  randomise(trained, 40);
  trained.methods().save(file);
  Model other(kLlama);
  auto c = bottleneck(3);
  c.seed = 99;
  other.add_bottlenecks(c, true, false);
  other.add_prefix(prefix(2));
  EXPECT_GT((other.forward(b.ids, b.mask) - trained.forward(b.ids, b.mask)).cwiseAbs().maxCoeff(), 1e-3);
  other.methods().load(file);
  EXPECT_EQ(other.forward(b.ids, b.mask), trained.forward(b.ids, b.mask));

  Model wider(kLlama);
  wider.add_bottlenecks(bottleneck(4), true, false);
  wider.add_prefix(prefix(2));
  const lora::Mat<double> before = wider.forward(b.ids, b.mask);
  EXPECT_LORA_ERROR(wider.methods().load(file), "model.layers.0.bottleneck_attn.down.weight is (3, 32), the model's (4, 32)");
  EXPECT_EQ(wider.forward(b.ids, b.mask), before);
  Model fewer(kLlama);
  fewer.add_prefix(prefix(2));
  EXPECT_LORA_ERROR(fewer.methods().load(file), "'model.layers.0.bottleneck_attn.down.bias' is not a tensor of the model's methods");
  EXPECT_LORA_ERROR(Model(kLlama).methods().load(file), "the model has no bottlenecks, prefix or ladder to load into");
  fs::remove(file);
}

// Bad settings and inputs: clear errors naming the problem, and the model as it was.
TEST(LmMethods, BadSettingsAreRefusedAndChangeNothing) {
  const lm_test::Batch b = lm_test::padded_batch();
  Model model(kLlama);
  const lora::Mat<double> base = model.forward(b.ids, b.mask);
  EXPECT_LORA_ERROR(model.add_bottlenecks(bottleneck(0)), "add_bottlenecks: size is 0, expected >= 1");
  EXPECT_LORA_ERROR(model.add_bottlenecks(bottleneck(2), false, false), "neither after the attention nor after the MLP");
  EXPECT_LORA_ERROR(model.add_prefix(prefix(64)), "a prefix of 64 positions leaves none of max_position_embeddings 64");
  EXPECT_LORA_ERROR(model.add_prefix(prefix(0)), "add_prefix: length is 0, expected >= 1");
  lora::LadderConfig lc;
  lc.reduction = 3;
  EXPECT_LORA_ERROR(model.add_ladder(lc), "the reduction factor 3 and 2 heads do not divide the width 32");
  lc.reduction = 8;
  lc.heads = 3;
  EXPECT_LORA_ERROR(model.add_ladder(lc), "the reduction factor 8 and 3 heads do not divide the width 32");
  EXPECT_FALSE(model.methods().any());
  EXPECT_EQ(model.trainable_parameters(), 0);
  EXPECT_EQ(model.forward(b.ids, b.mask), base);

  // A prefix takes positions: p + T must fit max_position_embeddings (64).
  model.add_prefix(prefix(10));
  EXPECT_LORA_ERROR(model.forward(Ids::Zero(1, 60)), "forward: a prefix of 10 positions and 60 tokens exceed max_position_embeddings 64");
  EXPECT_LORA_ERROR(model.forward_train(Ids::Zero(1, 60)), "a prefix of 10 positions and 60 tokens exceed max_position_embeddings 64");
  auto cache = model.make_cache(1, 60);
  EXPECT_LORA_ERROR(model.forward(Ids::Zero(1, 55), {}, &cache), "a prefix of 10 positions and 55 tokens exceed max_position_embeddings 64");
  EXPECT_EQ(cache.length, 10);
  EXPECT_NO_THROW(model.forward(Ids::Zero(1, 54), {}, &cache));
  EXPECT_LORA_ERROR(model.add_prefix(prefix(2)), "the model has a prefix already");
  lc.heads = 2;
  lc.reduction = 4;
  EXPECT_LORA_ERROR(model.add_ladder(lc), "a side network trains alone");
  // A cache made before the methods changed is refused.
  Model plain(kLlama);
  cache = plain.make_cache(1, 4);
  plain.add_bottlenecks(bottleneck(2));
  EXPECT_NO_THROW(plain.forward(Ids::Zero(1, 1), {}, &cache));  // bottlenecks need nothing cached
  plain.add_prefix(prefix(2));
  EXPECT_LORA_ERROR(plain.forward(Ids::Zero(1, 1), {}, &cache), "the cache was made for another set of methods");
  EXPECT_EQ(cache.length, 1);

  // The side network trains alone.
  const auto peft = lora::PeftConfig::read(kLlama + "/adapter/adapter_config.json");
  Model with_lora(kLlama, &peft);
  EXPECT_LORA_ERROR(with_lora.add_ladder(lc), "add_ladder: the model has LoRA layers or trained base weights");
  Model side(kLlama);
  side.add_ladder(lc);
  EXPECT_LORA_ERROR(side.add_bottlenecks(bottleneck(2)), "the model has a ladder side network, which trains alone");
  side.set_trainable({"lm_head"});
  EXPECT_LORA_ERROR(side.forward_train(b.ids, b.mask), "with a ladder side network only the side trains");
}
