#include <lora/lora_model.hpp>
#include <lora/peft.hpp>

#include "test_util.hpp"

#include <filesystem>
#include <fstream>
#include <gtest/gtest.h>

namespace fs = std::filesystem;
using lora::Mat;

namespace {

const std::string kTiny = data_path("peft/peft_tiny_decoder");
const std::string kPatterns = data_path("peft/peft_tiny_decoder_patterns");

std::string write(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << text;
  return p.string();
}

// A fresh scratch directory per test.
fs::path scratch(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("lora_test_peft_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

lora::PeftConfig parse(const std::string& text) { return lora::PeftConfig::from_json(text, "cfg"); }

// Every LoRA layer of the tiny decoder's state dict that the adapter targets.
template <class Scalar>
lora::LoraModel<Scalar> tiny_model(const std::string& dir) {
  return lora::LoraModel<Scalar>(dir + "/base_model.safetensors", lora::PeftConfig::read(dir + "/adapter/adapter_config.json"));
}

// A and B of every module, to check that a failed load changed nothing.
std::vector<Mat<double>> snapshot(const lora::ModuleMap<double>& m) {
  std::vector<Mat<double>> s;
  for (const auto& [path, layer] : m) {
    s.push_back(layer->lora_A());
    s.push_back(layer->lora_B());
  }
  return s;
}

}  // namespace

TEST(PeftConfig, TargetsMatchLikePeft) {
  auto c = parse(R"({"peft_type": "LORA", "target_modules": ["q_proj", "mlp.up_proj"]})");
  EXPECT_TRUE(c.targets("q_proj"));
  EXPECT_TRUE(c.targets("model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(c.targets("layers.1.mlp.up_proj"));
  EXPECT_FALSE(c.targets("layers.1.self_attn.xq_proj"));  // a suffix must start at a dot
  EXPECT_FALSE(c.targets("layers.1.q_proj.lin"));
  auto re = parse(R"({"peft_type": "LORA", "target_modules": ".*layers\\.1\\..*(q|v)_proj"})");
  EXPECT_TRUE(re.targets("model.layers.1.self_attn.v_proj"));
  EXPECT_FALSE(re.targets("model.layers.0.self_attn.v_proj"));
  EXPECT_FALSE(re.targets("model.layers.1.self_attn.v_proj.x"));  // the whole path must match
  auto lazy = parse(R"({"peft_type": "LORA", "target_modules": ".*?layers\\.[0-9]{1,2}?\\..*[*+?]?_proj"})");
  EXPECT_TRUE(lazy.targets("model.layers.12.self_attn.v_proj"));
  auto ex = parse(R"({"peft_type": "LORA", "target_modules": ["q_proj"], "exclude_modules": ["layers.0.q_proj"]})");
  EXPECT_FALSE(ex.targets("m.layers.0.q_proj"));
  EXPECT_TRUE(ex.targets("m.layers.1.q_proj"));
}

TEST(PeftConfig, PatternsTakeTheFirstMatchingKeyInFileOrder) {
  auto c = parse(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                     "rank_pattern": {"layers.1.q_proj": 16, "q_proj": 2},
                     "alpha_pattern": {"v_proj": 3.5}})");
  EXPECT_EQ(c.rank_for("model.layers.1.q_proj"), 16);
  EXPECT_EQ(c.rank_for("model.layers.0.q_proj"), 2);
  EXPECT_EQ(c.rank_for("model.layers.0.v_proj"), 4);
  EXPECT_EQ(c.rank_for("model.layers.11.q_proj"), 2);  // "layers.1.q_proj" must match after a dot
  EXPECT_EQ(c.alpha_for("model.layers.0.v_proj"), 3.5);
  EXPECT_EQ(c.alpha_for("model.layers.0.q_proj"), 8);
  const lora::LoraConfig lc = c.lora_config("model.layers.1.q_proj");
  EXPECT_EQ(lc.r, 16);
  EXPECT_EQ(lc.alpha, 8);
}

TEST(PeftConfig, BadConfigsAreRefusedByName) {
  const std::pair<const char*, std::vector<std::string>> table[] = {
      {"{not json", {"cfg", "not valid JSON"}},
      {"[1, 2]", {"expected a JSON object"}},
      {R"({"target_modules": ["q"]})", {"peft_type is missing"}},
      {R"({"peft_type": "IA3", "target_modules": ["q"]})", {"peft_type", "IA3", "only \"LORA\""}},
      {R"({"peft_type": "LORA", "r": 0, "target_modules": ["q"]})", {"r is 0", "integer >= 1"}},
      {R"({"peft_type": "LORA", "r": 2.5, "target_modules": ["q"]})", {"r is 2.5"}},
      {R"({"peft_type": "LORA", "lora_alpha": -1, "target_modules": ["q"]})", {"lora_alpha is -1"}},
      {R"({"peft_type": "LORA", "lora_dropout": 1, "target_modules": ["q"]})", {"lora_dropout is 1"}},
      {R"({"peft_type": "LORA"})", {"target_modules is missing or null"}},
      {R"({"peft_type": "LORA", "target_modules": null})", {"target_modules is missing or null"}},
      {R"({"peft_type": "LORA", "target_modules": 3})", {"target_modules is 3"}},
      {R"({"peft_type": "LORA", "target_modules": ["q", 1]})", {"target_modules holds 1"}},
      {R"({"peft_type": "LORA", "target_modules": "(q"})", {"target_modules is not a regular expression", "missing ): (q"}},
      // found by fuzz_peft_config when std::regex matched: a huge back-reference, ".**" (Python
      // refuses it; std::regex backtracked for minutes), a repeat of a repeat
      {R"({"peft_type": "LORA", "target_modules": ".*\\2222222222222222222222v)_p"})", {"target_modules is not", "unexpected )"}},
      {R"({"peft_type": "LORA", "target_modules": ["q"], "rank_pattern": {"q{99999999}": 2}})", {"rank_pattern key", "invalid repetition size"}},
      {R"({"peft_type": "LORA", "target_modules": ".**\\.(q|v)_proj"})", {"target_modules is not", "bad repetition operator: **"}},
      {R"({"peft_type": "LORA", "target_modules": ["q"], "rank_pattern": {"q_+*": 2}})", {"rank_pattern key", "bad repetition operator: +*"}},
      // Python's re has them; no linear-time matcher does
      {R"({"peft_type": "LORA", "target_modules": "(?=q)q_proj"})", {"target_modules is not", "invalid perl operator: (?=", "look-around"}},
      {R"({"peft_type": "LORA", "target_modules": "(q)\\1_proj"})", {"target_modules is not", "invalid escape sequence: \\1"}},
      {R"({"peft_type": "LORA", "target_modules": ["q"], "rank_pattern": {"q": 0}})", {"rank_pattern[\"q\"] is 0"}},
      {R"({"peft_type": "LORA", "target_modules": ["q"], "rank_pattern": {"(q": 2}})", {"rank_pattern key \"(q\""}},
      {R"({"peft_type": "LORA", "target_modules": ["q"], "alpha_pattern": []})", {"alpha_pattern is []"}},
      {R"({"peft_type": "LORA", "target_modules": ["q"], "use_rslora": "yes"})", {"use_rslora is \"yes\""}},
      {R"({"peft_type": "LORA", "target_modules": ["q"], "use_dora": 1})", {"use_dora is 1", "true or false"}},
      {R"({"peft_type": "LORA", "target_modules": ["q"], "bias": "all"})", {"bias is \"all\"", "only \"none\""}},
      // modules_to_save names base modules (a causal LM's load_adapter takes them; test_models)
      {R"({"peft_type": "LORA", "target_modules": ["q"], "modules_to_save": "head"})", {"modules_to_save is \"head\"", "a list of module names"}},
      {R"({"peft_type": "LORA", "target_modules": ["q"], "modules_to_save": [1]})", {"modules_to_save holds 1"}},
      {R"({"peft_type": "LORA", "target_modules": ["q"], "layers_to_transform": [0]})", {"layers_to_transform is [0]"}},
  };
  for (const auto& [text, frags] : table) {
    SCOPED_TRACE(text);
    try {
      parse(text);
      ADD_FAILURE() << "accepted";
    } catch (const lora::Error& e) {
      for (const auto& f : frags) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what() << " lacks " << f;
    }
  }
}

// Regression (issue 24): with std::regex, "(a+)+$" took time doubling per character of the path
// (30 characters: 31 s) and ".*\.(q|v)_proj" overflowed the stack on a 50,000-character path.
TEST(PeftConfig, MatchingIsLinearInThePathWhateverThePattern) {
  auto c = parse(R"({"peft_type": "LORA", "target_modules": "(a+)+$", "rank_pattern": {"(a|aa)+": 2}})");
  const std::string as(100000, 'a');
  EXPECT_FALSE(c.targets(as + "b"));
  EXPECT_TRUE(c.targets(as));
  EXPECT_EQ(c.rank_for("x." + as), 2);
  EXPECT_EQ(c.rank_for(as + "b"), 8);
  auto qv = parse(R"({"peft_type": "LORA", "target_modules": ".*\\.(q|v)_proj"})");
  const std::string long_path(50000, 'x');
  EXPECT_TRUE(qv.targets(long_path + ".q_proj"));
  EXPECT_FALSE(qv.targets(long_path + ".k_proj"));
  // Python's syntax for groups, classes and flags, as configs use it
  auto py = parse(R"({"peft_type": "LORA", "target_modules": "(?i)model\\.layers\\.(?P<n>[0-9]+)\\.(?:self_attn)\\.[qv]_PROJ"})");
  EXPECT_TRUE(py.targets("model.layers.12.self_attn.q_proj"));
  EXPECT_FALSE(py.targets("model.layers.x.self_attn.q_proj"));
}

// Regression (issue 24): a value nested 100,000 deep (in r, in target_modules or in an unknown
// field kept for writing back) crashed the process (SIGSEGV) while parsing or building the error.
TEST(PeftConfig, DeeplyNestedJsonIsRefused) {
  auto nested = [](int depth) { return std::string(depth, '[') + "1" + std::string(depth, ']'); };
  for (const std::string field : {"r", "target_modules", "future_option"}) {
    SCOPED_TRACE(field);
    std::string text = R"({"peft_type": "LORA", "target_modules": ["q"], ")" + field + "\": " + nested(100000) + "}";
    if (field == "target_modules") text = R"({"peft_type": "LORA", "target_modules": )" + nested(100000) + "}";
    EXPECT_LORA_ERROR(parse(text), "cfg", "nesting deeper than 128 levels");
  }
  // Nesting within the limit is kept and written back.
  auto c = parse(R"({"peft_type": "LORA", "target_modules": ["q"], "future_option": )" + nested(100) + "}");
  EXPECT_EQ(parse(c.to_json()).to_json(), c.to_json());
}

TEST(PeftConfig, UnknownFieldsAndPeftDefaultsAreKept) {
  auto c = parse(R"({"peft_type": "LORA", "target_modules": ["q"], "future_option": {"x": 1},
                     "use_dora": false, "modules_to_save": null, "task_type": "CAUSAL_LM"})");
  auto j = nlohmann::json::parse(c.to_json());
  EXPECT_EQ(j["future_option"]["x"], 1);
  EXPECT_EQ(j["task_type"], "CAUSAL_LM");
  EXPECT_EQ(j["r"], 8);  // PEFT's default r and alpha when absent
  EXPECT_EQ(j["lora_alpha"], 8);
  EXPECT_EQ(j["bias"], "none");
  // and the text parses back to the same config
  auto c2 = parse(c.to_json());
  EXPECT_EQ(c2.to_json(), c.to_json());
}

TEST(Peft, LoadsEveryTargetedModuleBitExactly) {
  auto model = tiny_model<double>(kTiny);
  EXPECT_EQ(model.modules().size(), 8u);  // q, v, up, down in two blocks
  lora::load_adapter(kTiny + "/adapter", model.modules());
  const auto st = lora::SafeTensors::open(kTiny + "/adapter/adapter_model.safetensors");
  for (const auto& [path, layer] : model.modules()) {
    SCOPED_TRACE(path);
    EXPECT_EQ(layer->lora_A(), st.matrix<double>("base_model.model." + path + ".lora_A.weight"));
    EXPECT_EQ(layer->lora_B(), st.matrix<double>("base_model.model." + path + ".lora_B.weight"));
    EXPECT_EQ(layer->rank(), 4);
    EXPECT_EQ(layer->scaling(), 2.0);
    EXPECT_EQ(layer->config().dropout, 0.05);
  }
}

TEST(Peft, RankAndAlphaPatternsReachTheLayers) {
  auto model = tiny_model<double>(kPatterns);
  lora::load_adapter(kPatterns + "/adapter", model.modules());
  EXPECT_EQ(model.modules().at("layers.1.self_attn.q_proj").rank(), 8);
  EXPECT_EQ(model.modules().at("layers.1.self_attn.q_proj").scaling(), 1.0);  // 8 / 8
  EXPECT_EQ(model.modules().at("layers.0.self_attn.q_proj").rank(), 4);
  EXPECT_EQ(model.modules().at("layers.0.mlp.down_proj").scaling(), 6.0);  // 24 / 4
  EXPECT_EQ(model.modules().at("layers.0.mlp.up_proj").scaling(), 2.0);
}

TEST(Peft, SaveThenLoadRoundTripsBitExactlyInEveryDtype) {
  auto model = tiny_model<double>(kPatterns);
  const lora::PeftConfig cfg = lora::load_adapter(kPatterns + "/adapter", model.modules());
  const fs::path dir = scratch("roundtrip");
  // F64: the same bytes PEFT wrote.
  lora::save_adapter((dir / "f64").string(), model.modules(), cfg, lora::Dtype::F64);
  std::ifstream a(dir / "f64" / "adapter_model.safetensors", std::ios::binary), b(kPatterns + "/adapter/adapter_model.safetensors", std::ios::binary);
  EXPECT_TRUE(std::equal(std::istreambuf_iterator<char>(a), {}, std::istreambuf_iterator<char>(b), {}));
  EXPECT_EQ(nlohmann::json::parse(lora::detail::read_text((dir / "f64" / "adapter_config.json").string())),
            nlohmann::json::parse(lora::detail::read_text(kPatterns + "/adapter/adapter_config.json")));
  for (auto dtype : {lora::Dtype::F32, lora::Dtype::BF16, lora::Dtype::F16}) {
    SCOPED_TRACE(lora::dtype_name(dtype));
    const std::string d = (dir / lora::dtype_name(dtype)).string();
    lora::save_adapter(d, model.modules(), cfg, dtype);
    auto again = tiny_model<double>(kPatterns);
    lora::load_adapter(d, again.modules());
    auto third = tiny_model<double>(kPatterns);
    lora::save_adapter(d + "_2", again.modules(), cfg, dtype);
    lora::load_adapter(d + "_2", third.modules());
    for (const auto& [path, layer] : model.modules()) {
      // load -> save -> load is exact; against the f64 original, the dtype's rounding
      const auto& A2 = again.modules().at(path).lora_A();
      EXPECT_EQ(third.modules().at(path).lora_A(), A2);
      EXPECT_EQ(third.modules().at(path).lora_B(), again.modules().at(path).lora_B());
      const double tol = dtype == lora::Dtype::F32 ? 1e-7 : dtype == lora::Dtype::F16 ? 1e-3 : 8e-3;
      EXPECT_LE((A2 - layer->lora_A()).cwiseAbs().maxCoeff(), tol * layer->lora_A().cwiseAbs().maxCoeff());
    }
  }
}

TEST(Peft, PeftConfigForDescribesLayersWithDifferentRanks) {
  lora::PeftConfig cfg = lora::PeftConfig::read(kTiny + "/adapter/adapter_config.json");
  lora::LoraModel<double> model(kTiny + "/base_model.safetensors", cfg);
  lora::LoraConfig odd;
  odd.r = 6;
  odd.alpha = 3;
  model.modules().at("layers.1.mlp.up_proj").update_layer(odd);
  const lora::PeftConfig derived = lora::peft_config_for(model.modules());
  EXPECT_EQ(derived.r, 4);  // the other seven layers have the adapter's r and alpha
  EXPECT_EQ(derived.lora_alpha, 8);
  EXPECT_EQ(derived.rank_for("layers.1.mlp.up_proj"), 6);
  EXPECT_EQ(derived.alpha_for("layers.1.mlp.up_proj"), 3);
  EXPECT_EQ(derived.rank_for("layers.0.mlp.up_proj"), 4);
  EXPECT_EQ(derived.alpha_for("layers.0.mlp.up_proj"), 8);
  const fs::path dir = scratch("derived");
  lora::save_adapter(dir.string(), model.modules(), derived);
  lora::LoraModel<double> other(kTiny + "/base_model.safetensors", cfg);
  lora::load_adapter(dir.string(), other.modules());
  EXPECT_EQ(other.modules().at("layers.1.mlp.up_proj").rank(), 6);
  EXPECT_EQ(other.modules().at("layers.1.mlp.up_proj").lora_A().cast<float>(),
            model.modules().at("layers.1.mlp.up_proj").lora_A().cast<float>());
}

TEST(Peft, SaveRefusesAConfigThatDoesNotDescribeTheLayers) {
  auto model = tiny_model<double>(kTiny);
  lora::PeftConfig cfg = lora::load_adapter(kTiny + "/adapter", model.modules());
  const fs::path dir = scratch("refuse");
  lora::PeftConfig wrong_r = cfg;
  wrong_r.r = 5;
  EXPECT_LORA_ERROR(lora::save_adapter(dir.string(), model.modules(), wrong_r), "layers.0.mlp.down_proj has r = 4",
                    "the config gives 5");
  lora::PeftConfig narrow = cfg;
  narrow.target_modules = {"q_proj"};
  EXPECT_LORA_ERROR(lora::save_adapter(dir.string(), model.modules(), narrow), "layers.0.mlp.up_proj is not selected");
  EXPECT_LORA_ERROR(lora::save_adapter(dir.string(), model.modules(), cfg, lora::Dtype::I32), "dtype I32 is not a float type");
  EXPECT_TRUE(fs::is_empty(dir));  // nothing written
}

TEST(Peft, BrokenAdapterDirectoriesChangeNothing) {
  const fs::path root = scratch("broken");
  auto model = tiny_model<double>(kTiny);
  const auto before = snapshot(model.modules());
  const std::string good_cfg = lora::detail::read_text(kTiny + "/adapter/adapter_config.json");
  const auto st = lora::SafeTensors::open(kTiny + "/adapter/adapter_model.safetensors");
  const std::string key = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight";

  // Writes a directory whose safetensors holds the fixture's tensors, changed by edit.
  auto make = [&](const std::string& name, const std::string& cfg, auto edit) {
    const fs::path d = root / name;
    fs::create_directories(d);
    if (!cfg.empty()) write(d / "adapter_config.json", cfg);
    lora::SafeTensorsBuilder b;
    bool keep = edit(b);
    if (keep)
      for (const auto& t : st.tensors())
        if (t.name != key) b.add(t.name, st.matrix<double>(t.name));
    b.save((d / "adapter_model.safetensors").string());
    return d.string();
  };
  auto same = [&](lora::SafeTensorsBuilder& b) { return b.add(key, st.matrix<double>(key)), true; };

  const fs::path no_weights = root / "no_weights";
  write(no_weights / "adapter_config.json", good_cfg);
  EXPECT_LORA_ERROR(lora::load_adapter(no_weights.string(), model.modules()), "adapter_model.safetensors does not exist");
  EXPECT_LORA_ERROR(lora::load_adapter(make("no_config", "", same), model.modules()), "adapter_config.json does not exist");
  EXPECT_LORA_ERROR(lora::load_adapter(make("bad_json", "{\"r\": ", same), model.modules()), "adapter_config.json", "not valid JSON");
  EXPECT_LORA_ERROR(lora::load_adapter(make("wrong_shape", good_cfg,
                                            [&](auto& b) { return b.add(key, Mat<double>::Zero(4, 31)), true; }),
                                       model.modules()),
                    key, "[4, 31]", "expected [4, 32]");
  EXPECT_LORA_ERROR(lora::load_adapter(make("wrong_dtype", good_cfg,
                                            [&](auto& b) { return b.add(key, Mat<std::int64_t>::Zero(4, 32)), true; }),
                                       model.modules()),
                    key, "dtype I64");
  EXPECT_LORA_ERROR(lora::load_adapter(make("only_B", good_cfg, [&](auto&) { return true; }), model.modules()),
                    "layers.0.self_attn.q_proj has lora_B but no lora_A");
  EXPECT_LORA_ERROR(
      lora::load_adapter(make("unknown_module", good_cfg,
                              [&](auto& b) {
                                b.add("base_model.model.layers.7.mlp.up_proj.lora_A.weight", Mat<double>::Zero(4, 32));
                                b.add("base_model.model.layers.7.mlp.up_proj.lora_B.weight", Mat<double>::Zero(64, 4));
                                return b.add(key, st.matrix<double>(key)), true;
                              }),
                         model.modules()),
      "modules in the file but not in the model: layers.7.mlp.up_proj");
  EXPECT_LORA_ERROR(lora::load_adapter(make("not_a_lora_key", good_cfg,
                                            [&](auto& b) { return b.add("base_model.model.lm_head.weight", Mat<double>::Zero(2, 2)), same(b); }),
                                       model.modules()),
                    "lm_head.weight' is not a PEFT LoRA key");
  // Regression (issue 24): module names come from the file; a 50,000-character one is refused
  // before any matching.
  const std::string long_key = "base_model.model." + std::string(50000, 'x') + ".q_proj.lora_A.weight";
  EXPECT_LORA_ERROR(lora::load_adapter(make("long_key", good_cfg,
                                            [&](auto& b) { return b.add(long_key, Mat<double>::Zero(2, 2)), same(b); }),
                                       model.modules()),
                    "a tensor name is 50038 bytes long, more than 1024", "base_model.model.xxx");
  EXPECT_LORA_ERROR(lora::load_adapter(make("embedding", good_cfg,
                                            [&](auto& b) { return b.add("base_model.model.embed.lora_embedding_A", Mat<double>::Zero(2, 2)), same(b); }),
                                       model.modules()),
                    "lora_embedding_A", "not supported");
  // A targeted module without weights: the file lacks both tensors of one module.
  const std::string q1 = "base_model.model.layers.1.self_attn.q_proj.lora_";
  const fs::path missing = root / "missing_module";
  fs::create_directories(missing);
  write(missing / "adapter_config.json", good_cfg);
  lora::SafeTensorsBuilder mb;
  for (const auto& t : st.tensors())
    if (t.name.rfind(q1, 0) != 0) mb.add(t.name, st.matrix<double>(t.name));
  mb.save((missing / "adapter_model.safetensors").string());
  EXPECT_LORA_ERROR(lora::load_adapter(missing.string(), model.modules()),
                    "targeted modules with no weights in the file: layers.1.self_attn.q_proj");
  // A config that selects fewer modules than the file holds.
  nlohmann::json narrow = nlohmann::json::parse(good_cfg);
  narrow["target_modules"] = {"q_proj", "v_proj"};
  EXPECT_LORA_ERROR(lora::load_adapter(make("narrow_config", narrow.dump(), same), model.modules()),
                    "modules with weights that target_modules does not select: layers.0.mlp.down_proj");
  EXPECT_EQ(snapshot(model.modules()), before);
  const Mat<double> q1_before = model.modules().at("layers.1.self_attn.q_proj").lora_A();

  // Not strict: the missing module is skipped and left as it was, the others load.
  lora::LoadOptions lenient;
  lenient.strict = false;
  lora::load_adapter(missing.string(), model.modules(), lenient);
  EXPECT_EQ(model.modules().at("layers.1.self_attn.q_proj").lora_A(), q1_before);
  EXPECT_EQ(model.modules().at("layers.0.self_attn.q_proj").lora_A(), st.matrix<double>(key));
}

TEST(Peft, LoadIntoAMergedLayerIsRefused) {
  auto model = tiny_model<double>(kTiny);
  model.modules().at("layers.0.mlp.up_proj").merge();
  const auto before = snapshot(model.modules());
  EXPECT_LORA_ERROR(lora::load_adapter(kTiny + "/adapter", model.modules()), "layers.0.mlp.up_proj: adapter 'default' is merged");
  EXPECT_EQ(snapshot(model.modules()), before);
}

TEST(Peft, ModuleMapRefusesDuplicates) {
  lora::LoraLinear<double> l(Mat<double>::Ones(2, 3), std::nullopt, {});
  lora::ModuleMap<double> m;
  m.add("a.b", l);
  EXPECT_LORA_ERROR(m.add("a.b", l), "module 'a.b' is already registered");
  EXPECT_LORA_ERROR(m.at("a.c"), "no module 'a.c'");
}

// The merged state dict equals W + s·B·A computed here, and every other tensor is unchanged.
TEST(LoraModel, SavesMergedWeightsOfABf16AdapterOnGpt2Conv1D) {
  const std::string dir = data_path("models/tiny_gpt2");
  const auto cfg = lora::PeftConfig::read(dir + "/adapter_bf16/adapter_config.json");
  ASSERT_TRUE(cfg.fan_in_fan_out);
  lora::LoraModel<float> model(dir + "/model.safetensors", cfg);
  lora::load_adapter(dir + "/adapter_bf16", model.modules());
  const fs::path out = scratch("merged") / "model.safetensors";
  model.merge();
  model.save_weights(out.string());
  model.unmerge();
  const auto merged = lora::SafeTensors::open(out.string());
  const auto base = lora::SafeTensors::open(dir + "/model.safetensors");
  const auto ad = lora::SafeTensors::open(dir + "/adapter_bf16/adapter_model.safetensors");
  ASSERT_EQ(merged.tensors().size(), base.tensors().size());
  int adapted = 0;
  for (const auto& t : base.tensors()) {
    SCOPED_TRACE(t.name);
    const std::string module = t.name.substr(0, t.name.rfind('.'));
    if (model.modules().contains(module) && t.name == module + ".weight") {
      ++adapted;
      const Mat<double> A = ad.matrix<double>("base_model.model." + module + ".lora_A.weight");
      const Mat<double> B = ad.matrix<double>("base_model.model." + module + ".lora_B.weight");
      const Mat<double> want = base.matrix<double>(t.name) + (cfg.lora_alpha / cfg.r) * (B * A).transpose();  // (in, out)
      EXPECT_LE((merged.matrix<double>(t.name) - want).cwiseAbs().maxCoeff(), 1e-6 * want.cwiseAbs().maxCoeff());
    } else {
      EXPECT_EQ(merged.info(t.name).shape, t.shape);
      EXPECT_TRUE(std::equal(merged.bytes(t.name), merged.bytes(t.name) + (t.end - t.begin), base.bytes(t.name)));
    }
  }
  EXPECT_EQ(adapted, 8);
}

TEST(Peft, LoadsIntoANamedAdapterAndSavesItByName) {
  auto model = tiny_model<double>(kTiny);
  const auto before = snapshot(model.modules());  // "default": fresh init, active
  lora::LoadOptions opt;
  opt.adapter_name = "task";
  const lora::PeftConfig cfg = lora::load_adapter(kTiny + "/adapter", model.modules(), opt);
  EXPECT_EQ(snapshot(model.modules()), before);  // the default adapter is untouched
  const auto st = lora::SafeTensors::open(kTiny + "/adapter/adapter_model.safetensors");
  for (const auto& [path, layer] : model.modules()) {
    SCOPED_TRACE(path);
    EXPECT_EQ(layer->adapter_names(), (std::vector<std::string>{"default", "task"}));
    EXPECT_EQ(layer->active_adapters(), std::vector<std::string>{"default"});  // added, not active (PEFT)
    EXPECT_EQ(layer->lora_A("task"), st.matrix<double>("base_model.model." + path + ".lora_A.weight"));
    EXPECT_EQ(layer->lora_B("task"), st.matrix<double>("base_model.model." + path + ".lora_B.weight"));
  }
  // Saved by name, in F64: the same bytes PEFT wrote; the active "default" is not what is saved.
  const fs::path dir = scratch("named");
  lora::save_adapter(dir.string(), model.modules(), cfg, lora::Dtype::F64, "task");
  std::ifstream a(dir / "adapter_model.safetensors", std::ios::binary), b(kTiny + "/adapter/adapter_model.safetensors", std::ios::binary);
  EXPECT_TRUE(std::equal(std::istreambuf_iterator<char>(a), {}, std::istreambuf_iterator<char>(b), {}));
  EXPECT_LORA_ERROR(lora::save_adapter((dir / "x").string(), model.modules(), cfg, lora::Dtype::F64, "nope"), "has no adapter 'nope'");
  EXPECT_FALSE(fs::exists(dir / "x"));
  // A merged named adapter is not replaced.
  model.modules().at("layers.0.mlp.up_proj").merge({"task"});
  EXPECT_LORA_ERROR(lora::load_adapter(kTiny + "/adapter", model.modules(), opt), "adapter 'task' is merged");
}

TEST(Peft, DoraAdaptersRoundTripWithTheirMagnitudes) {
  auto model = tiny_model<double>(kTiny);
  lora::PeftConfig cfg = lora::load_adapter(kTiny + "/adapter", model.modules());
  cfg.use_dora = true;
  cfg.lora_dropout = 0;  // DoRA here needs dropout 0
  std::uint64_t seed = 50;
  for (const auto& [path, layer] : model.modules()) {
    layer->update_layer(cfg.lora_config(path, layer->config()));
    layer->set_lora_A(random_normal(layer->rank(), layer->in_features(), ++seed));
    layer->set_lora_B(random_normal(layer->out_features(), layer->rank(), ++seed));
    layer->set_lora_magnitude(random_normal(layer->out_features(), 1, ++seed).col(0).cwiseAbs());
  }
  // Written where CI's check_peft_adapter.py looks for it.
  const fs::path dir = fs::temp_directory_path() / "lora_test_peft_dora";
  fs::remove_all(dir);
  lora::save_adapter(dir.string(), model.modules(), cfg, lora::Dtype::F64);
  const auto st = lora::SafeTensors::open((dir / "adapter_model.safetensors").string());
  const auto& t = st.info("base_model.model.layers.0.mlp.up_proj.lora_magnitude_vector");
  EXPECT_EQ(t.shape, (std::vector<std::uint64_t>{64}));
  EXPECT_EQ(nlohmann::json::parse(lora::detail::read_text((dir / "adapter_config.json").string()))["use_dora"], true);

  auto again = tiny_model<double>(kTiny);
  lora::load_adapter(dir.string(), again.modules());
  for (const auto& [path, layer] : model.modules()) {
    SCOPED_TRACE(path);
    const auto& other = again.modules().at(path);
    EXPECT_TRUE(other.use_dora());
    EXPECT_EQ(other.lora_magnitude(), layer->lora_magnitude());
    const Mat<double> x = random_normal(3, layer->in_features(), 7);
    EXPECT_EQ(other.forward(x), layer->forward(x));
  }
  // A DoRA file with dropout, or a magnitude in a file whose config says use_dora false, is refused.
  nlohmann::json j = nlohmann::json::parse(lora::detail::read_text((dir / "adapter_config.json").string()));
  j["lora_dropout"] = 0.1;
  write(dir / "adapter_config.json", j.dump());
  EXPECT_LORA_ERROR(lora::load_adapter(dir.string(), again.modules()), "use_dora with lora_dropout > 0");
  j["lora_dropout"] = 0;
  j["use_dora"] = false;
  write(dir / "adapter_config.json", j.dump());
  EXPECT_LORA_ERROR(lora::load_adapter(dir.string(), again.modules()), "has a lora_magnitude_vector but use_dora is false");
  EXPECT_TRUE(again.modules().at("layers.0.mlp.up_proj").use_dora());  // unchanged by the refusals
  fs::remove_all(dir);
  lora::save_adapter(dir.string(), model.modules(), cfg, lora::Dtype::F32);  // left for the checker
}

// Both files or neither (before: the weights were replaced, and a later load gave the old
// config's alpha with the new weights).
TEST(Peft, SaveAdapterIsAllOrNothing) {
  const fs::path dir = scratch("all_or_nothing");
  lora::LoraConfig lc;
  lc.r = 2;
  lc.alpha = 4;
  lora::LoraLinear<double> layer(random_mat(5, 6, 1), std::nullopt, lc);
  layer.set_lora_B(random_mat(5, 2, 2));
  lora::ModuleMap<double> modules;
  modules.add("model.proj", layer);
  lora::PeftConfig cfg = lora::peft_config_for(modules);
  lora::save_adapter(dir.string(), modules, cfg);
  const std::string weights = lora::detail::read_text((dir / "adapter_model.safetensors").string());
  const std::string config = lora::detail::read_text((dir / "adapter_config.json").string());

  // A new adapter (other alpha, other B) whose config cannot be written: a directory stands in
  // the config's place.
  lora::LoraConfig lc2 = lc;
  lc2.alpha = 16;
  layer.update_layer(lc2);
  layer.set_lora_B(random_mat(5, 2, 3));
  const lora::PeftConfig cfg2 = lora::peft_config_for(modules);
  const fs::path blocked = scratch("all_or_nothing_blocked");
  fs::copy(dir, blocked);
  fs::remove(blocked / "adapter_config.json");
  fs::create_directories(blocked / "adapter_config.json" / "x");
  const std::string old_blocked = lora::detail::read_text((blocked / "adapter_model.safetensors").string());
  EXPECT_LORA_ERROR(lora::save_adapter(blocked.string(), modules, cfg2), "adapter_config.json", "not a regular file");
  EXPECT_EQ(lora::detail::read_text((blocked / "adapter_model.safetensors").string()), old_blocked);

  // A file-size limit: the weights' temporary file cannot be written; nothing is replaced.
  with_file_size_limit(64, [&] { EXPECT_LORA_ERROR(lora::save_adapter(dir.string(), modules, cfg2), "write failed"); });
  EXPECT_EQ(lora::detail::read_text((dir / "adapter_model.safetensors").string()), weights);
  EXPECT_EQ(lora::detail::read_text((dir / "adapter_config.json").string()), config);
  std::size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir)) files += e.is_regular_file();
  EXPECT_EQ(files, 2u);  // no temporary left behind
  // The old adapter still loads as it was saved.
  lora::LoraLinear<double> back(random_mat(5, 6, 1), std::nullopt, lc);
  lora::ModuleMap<double> back_map;
  back_map.add("model.proj", back);
  lora::load_adapter(dir.string(), back_map);
  EXPECT_EQ(back.config().alpha, 4);
  fs::remove_all(dir);
  fs::remove_all(blocked);
}
