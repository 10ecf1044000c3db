// text_lora: a byte-level Llama pre-trained in C++ on English fortune cookies, then adapted to
// German (or Spanish) ones seven ways (methods.hpp): the head alone, LoRA on q_proj and v_proj,
// LoRA on every linear, full fine-tuning, adapter-tuning, prefix-tuning and ladder side-tuning. Held-out bits per
// byte before and after, trainable parameters, training memory (the heap's peak, counted:
// heap_count.hpp), training tokens/s, inference latency per example against the base model's and
// generated samples for each; OUT/results.csv, OUT/curves.svg, the adapters as PEFT directories,
// the fine-tuned model as a Hugging Face checkpoint, the other methods' tensors as safetensors.
//
//   text_lora [--quick] [--out DIR] [--threads N] [--seed S] [--data DIR] [--target de|es]
//             [--pretrain-steps N] [--steps N] [--checkpoint-every N] [--max-steps N] [--resume DIR]
//
// The pre-trained model is cached in OUT/pretrained (config.json + model.safetensors, with the
// settings that made it in demo.json) and reused by later runs with the same settings.
// --checkpoint-every N writes a checkpoint every N steps of each phase; --max-steps N stops after
// N optimizer steps in all (pre-training and the three methods), leaving a checkpoint; --resume
// DIR continues the run whose --out was DIR from its latest checkpoint, with the same settings
// and thread count, to the same results (resume.hpp).
//
// Under mpirun (a build with MPI, LORA_MPI) each process is a rank that trains on its share of
// every batch (--threads per rank); the ranks' gradients are all-reduced each step, so the run
// trains the same weights as one process, up to the order of the sums. Rank 0 prints and writes.
//   mpirun -np 2 text_lora --threads 1
#include <lora/loss.hpp>
#include <lora/models/generate.hpp>
#include <lora/models/llama.hpp>
#include <lora/optim.hpp>
#include <lora/peft.hpp>
#include <lora/training_checkpoint.hpp>
#include <lora/version.hpp>

#include "../common/heap_count.hpp"
#include "../common/ranks.hpp"
#include "../common/report.hpp"
#include "corpus.hpp"
#include "methods.hpp"
#include "resume.hpp"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace text_lora;

namespace {

struct Settings {
  bool quick = false;
  std::string out = "text_lora_out", data = "/usr/share/games/fortunes", target = "de";
  int threads = 2;
  std::uint64_t seed = 1;
  long pretrain_steps = 1200, steps = 300;
  Eigen::Index batch = 16, T = 128, eval_windows = 64;
  int d = 128, layers = 4, heads = 4, kv_heads = 2, ff = 344;
  std::size_t english_bytes = 0, target_bytes = 0;  // 0: all
  int sample_bytes = 127;
  long checkpoint_every = 0, max_steps = 0;
  std::string resume;
};

// What decides the results (a resumed run has the same): f(name, field) for each, to write and
// to read OUT/run.json from one list.
template <class S, class F>
void result_settings(S& s, F&& f) {
  f("quick", s.quick), f("threads", s.threads), f("seed", s.seed), f("data", s.data), f("target", s.target);
  f("pretrain_steps", s.pretrain_steps), f("steps", s.steps), f("batch", s.batch), f("T", s.T);
  f("eval_windows", s.eval_windows), f("d", s.d), f("layers", s.layers), f("heads", s.heads), f("kv_heads", s.kv_heads);
  f("ff", s.ff), f("english_bytes", s.english_bytes), f("target_bytes", s.target_bytes), f("sample_bytes", s.sample_bytes);
}

nlohmann::json settings_json(const Settings& s) {
  nlohmann::json j;
  result_settings(s, [&](const char* name, const auto& v) { j[name] = v; });
  return j;
}

std::string config_json(const Settings& s) {
  char buf[1024];
  std::snprintf(buf, sizeof buf, R"({
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "vocab_size": %lld,
  "hidden_size": %d,
  "intermediate_size": %d,
  "num_hidden_layers": %d,
  "num_attention_heads": %d,
  "num_key_value_heads": %d,
  "head_dim": %d,
  "max_position_embeddings": %lld,
  "rms_norm_eps": 1e-05,
  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
  "hidden_act": "silu",
  "attention_bias": false,
  "mlp_bias": false,
  "tie_word_embeddings": true,
  "bos_token_id": %lld,
  "eos_token_id": %lld,
  "dtype": "float32"
}
)",
                static_cast<long long>(kVocab), s.d, s.ff, s.layers, s.heads, s.kv_heads, s.d / s.heads,
                static_cast<long long>(2 * s.T), static_cast<long long>(kBos), static_cast<long long>(kEos));
  return buf;
}

// Mean bits per predicted token of the windows (rows of ids), batch rows at a time.
double bits_per_byte(const Model& model, const Ids& windows, Eigen::Index batch) {
  double nats = 0, count = 0;
  for (Eigen::Index r = 0; r < windows.rows(); r += batch) {
    const Ids ids = windows.middleRows(r, std::min(batch, windows.rows() - r));
    const Ids labels = labels_for(ids);
    const double n = double((labels.rightCols(ids.cols() - 1).array() != -100).count());
    nats += double(lora::causal_lm_loss<float>(model.forward(ids), labels).loss) * n;
    count += n;
  }
  return nats / count / std::log(2.0);
}

std::string sample(const Model& model, const Settings& s, std::uint64_t seed) {
  lora::GenerationConfig g;
  g.max_new_tokens = int(std::min<Eigen::Index>(s.sample_bytes, s.T - 1));
  g.temperature = 0.8;
  g.top_k = 40;
  g.seed = seed;
  g.stop_tokens = {kEos};
  return decode(lora::generate(model, {{kBos}}, g)[0]);
}

// steps of AdamW (warmup + cosine, clipping at 1) on random windows of stream; the held-out bits
// per byte every steps/5 go into run.held, the mean training loss every steps/20 into run.train.
// From phase_dir's latest checkpoint when there is one (model already holds its weights);
// checkpoints go there (write_model writes the model's trainable state) as res asks.
void train(Model& model, const Settings& s, const std::vector<std::int64_t>& stream, const Ids& held, double lr, long steps,
           Run& run, const std::string& phase_dir, const std::function<void(const std::string&)>& write_model, Resumable& res,
           demo::Ranks& ranks) {
  lora::AdamWOptions o;
  o.lr = lr;
  o.weight_decay = 0.01;
  lora::AdamW<float> opt(o);
  auto params = model.parameters();
  opt.add(params);
  ranks.broadcast(params);
  std::mt19937_64 rng(s.seed + 17);
  double sum = 0, train_seconds = 0, seconds = 0;
  int n = 0;
  run.held.x = {0};
  run.held.y = {run.before};
  const std::string resumed = lora::latest_training_checkpoint(phase_dir);
  if (!resumed.empty()) {
    const nlohmann::json p = lora::resume_training(resumed, model.modules(), opt);
    try {
      const Run saved = run_from_json(p.at("run"), resumed);
      run.train = saved.train;
      run.held = saved.held;
      rng_from_text(rng, p.at("rng").get<std::string>(), resumed);
      sum = p.at("sum");
      n = p.at("n");
      train_seconds = p.at("train_seconds");
      seconds = p.at("seconds");
    } catch (const nlohmann::json::exception& e) {
      lora::detail::fail(resumed, ": progress: ", e.what());
    }
    res.taken += opt.steps();
    std::printf("%s: resumed at step %ld from %s\n", run.name.c_str(), opt.steps(), resumed.c_str());
  }
  Progress bar(run.name, steps);
  const auto checkpoint = [&] {
    nlohmann::json p = {{"run", to_json(run)}, {"rng", rng_text(rng)}, {"sum", sum}, {"n", n}, {"train_seconds", train_seconds},
                        {"seconds", seconds + bar.seconds()}};
    ranks.check_agreement(params, "at step " + std::to_string(opt.steps()) + " of " + run.name);
    if (ranks.writer()) lora::save_training_checkpoint<float>(phase_dir, write_model, model.modules(), opt, p);
    ranks.barrier();
  };
  const double reduce_before = ranks.reduce_seconds();
  const long every = std::max(1L, steps / 20), eval_every = std::max(1L, steps / 5);
  for (long step = opt.steps(); step < steps; ++step) {
    if (res.max_steps && res.taken >= res.max_steps) {
      if (resumed.empty() || step > lora::training_checkpoints(phase_dir).back().first) checkpoint();
      bar.finish();
      throw Stopped{};
    }
    const auto t0 = Progress::Clock::now();
    const Ids batch = random_windows(stream, s.batch, s.T, rng);
    const auto [begin, rows] = ranks.shard(s.batch);
    const Ids ids = batch.middleRows(begin, rows);
    model.zero_grad();
    const auto r = lora::causal_lm_loss<float>(model.forward_train(ids), labels_for(ids));
    model.backward(r.grad);
    const double loss = ranks.all_reduce(params, r.loss, double(r.count));  // the whole batch's
    lora::clip_grad_norm(params, 1.0);
    opt.set_lr(lora::warmup_cosine_lr(lr, step, steps / 10, steps));
    opt.step();
    ++res.taken;
    train_seconds += std::chrono::duration<double>(Progress::Clock::now() - t0).count();
    sum += loss / std::log(2.0);
    ++n;
    if ((step + 1) % every == 0) {
      run.train.x.push_back(double(step + 1));
      run.train.y.push_back(sum / n);
      sum = 0;
      n = 0;
    }
    if ((step + 1) % eval_every == 0 || step + 1 == steps) {
      if (run.held.x.back() != double(step + 1)) {
        run.heap_peak = std::max(run.heap_peak, double(demo::heap::peak()));  // the training's peak, not evaluation's
        run.held.x.push_back(double(step + 1));
        run.held.y.push_back(bits_per_byte(model, held, s.batch));
        demo::heap::reset_peak();
      }
    }
    bar.update(step + 1, loss / std::log(2.0));
    if (res.every && (step + 1) % res.every == 0 && step + 1 < steps) checkpoint();
  }
  run.heap_peak = std::max(run.heap_peak, double(demo::heap::peak()));
  run.seconds = seconds + bar.finish();
  run.tokens_per_s = double(steps) * double(s.batch * s.T) / train_seconds;
  if (ranks.size() > 1) {
    ranks.check_agreement(params, "after " + run.name);
    std::printf("  %d ranks: all-reduce %.2f s of %.2f s training (%.1f %%), %zu bytes per step\n", ranks.size(),
                ranks.reduce_seconds() - reduce_before, train_seconds, 100 * (ranks.reduce_seconds() - reduce_before) / train_seconds,
                ranks.reduce_bytes());
  }
  run.after = run.held.y.back();
}

Settings parse(int argc, char** argv) {
  Settings s;
  std::string fixed;  // a flag that decides the results (refused with --resume)
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a != "--resume" && a != "--max-steps" && a != "--checkpoint-every") fixed = a;
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) lora::detail::fail(a, " needs a value");
      return argv[++i];
    };
    if (a == "--quick") {
      s.quick = true;
      s.pretrain_steps = 60;
      s.steps = 30;
      s.batch = 8;
      s.T = 64;
      s.eval_windows = 16;
      s.d = 64;
      s.layers = 2;
      s.ff = 172;
      s.english_bytes = 300000;
      s.target_bytes = 100000;
      s.sample_bytes = 60;
    } else if (a == "--out") {
      s.out = value();
    } else if (a == "--threads") {
      s.threads = std::stoi(value());
    } else if (a == "--seed") {
      s.seed = std::stoull(value());
    } else if (a == "--data") {
      s.data = value();
    } else if (a == "--target") {
      s.target = value();
    } else if (a == "--pretrain-steps") {
      s.pretrain_steps = std::stol(value());
    } else if (a == "--steps") {
      s.steps = std::stol(value());
    } else if (a == "--checkpoint-every") {
      s.checkpoint_every = std::stol(value());
    } else if (a == "--max-steps") {
      s.max_steps = std::stol(value());
    } else if (a == "--resume") {
      s.resume = value();
    } else {
      lora::detail::fail("unknown argument ", a, "; see the comment at the top of examples/text_lora/main.cpp");
    }
  }
  if (s.threads < 1 || s.pretrain_steps < 1 || s.steps < 1) lora::detail::fail("--threads, --pretrain-steps and --steps must be >= 1");
  if (s.checkpoint_every < 0 || s.max_steps < 0) lora::detail::fail("--checkpoint-every and --max-steps must be >= 0");
  if (!s.resume.empty()) {
    if (!fixed.empty())
      lora::detail::fail(fixed, " with --resume: the run continues with its own settings (", s.resume,
                         "/run.json); only --max-steps and --checkpoint-every may be given");
    const std::string label = s.resume + "/run.json";
    const nlohmann::json j = read_json(label);
    Settings r;
    r.out = s.resume;
    r.resume = s.resume;
    r.checkpoint_every = s.checkpoint_every;
    r.max_steps = s.max_steps;
    try {
      result_settings(r, [&](const char* name, auto& v) { j.at(name).get_to(v); });
    } catch (const nlohmann::json::exception& e) {
      lora::detail::fail(label, ": not a text_lora run's settings: ", e.what());
    }
    return r;
  }
  return s;
}

// The pre-trained model: OUT/pretrained when demo.json there matches these settings, else trained
// from a new model now (every weight trains; from a checkpoint of this run when there is one)
// and saved there.
void pretrain(const Settings& s, const Corpus& english, const Ids& held, const std::string& dir, const std::string& checkpoints,
              Resumable& res, demo::Ranks& ranks) {
  const std::string stamp = lora::detail::cat("{\"lora\": \"", LORA_VERSION_STRING, "\", \"seed\": ", s.seed,
                                              ", \"steps\": ", s.pretrain_steps, ", \"batch\": ", s.batch,
                                              ", \"english_bytes\": ", english.train.size(), "}\n");
  const std::string config = config_json(s), phase = checkpoints + "/pretrain";
  if (fs::exists(fs::path(dir) / "demo.json") && lora::detail::read_text(dir + "/demo.json") == stamp &&
      lora::detail::read_text(dir + "/config.json") == config && lora::training_checkpoints(phase).empty()) {
    if (fs::exists(phase + "/done.json")) res.taken += s.pretrain_steps;  // pre-trained in this run
    std::printf("pre-trained model: %s (cached)\n", dir.c_str());
    return;
  }
  const std::string resumed = lora::latest_training_checkpoint(phase);
  Model model = resumed.empty() ? Model(lora::LmConfig::from_json(config, "text_lora config"), s.seed) : Model(resumed);
  model.set_base_trainable(true);
  Run run;
  run.name = "pre-training (English)";
  run.before = resumed.empty() ? bits_per_byte(model, held, s.batch) : 0;  // a resume restores the curves
  train(model, s, english.train, held, 3e-3, s.pretrain_steps, run, phase, [&](const std::string& d) { model.save_pretrained(d); },
        res, ranks);
  run.before = run.held.y.front();
  std::printf("pre-trained %ld steps in %.0f s (%.0f tokens/s): English held-out %.3f -> %.3f bits per byte\n", s.pretrain_steps,
              run.seconds, run.tokens_per_s, run.before, run.after);
  if (ranks.writer()) {
    fs::remove_all(dir);
    model.save_pretrained(dir);
    lora::detail::write_file_atomic(dir + "/demo.json", lora::detail::FileBytes(stamp.begin(), stamp.end()));
    write_json(phase + "/done.json", to_json(run));
    for (const auto& [step, ck] : lora::training_checkpoints(phase)) fs::remove_all(ck);
  }
  ranks.barrier();
}

}  // namespace

int main(int argc, char** argv) try {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines appear as they are printed, in logs too
  demo::Ranks ranks(argc, argv);
  const Settings s = parse(argc, argv);
  lora::set_num_threads(s.threads);
  fs::create_directories(s.out);
  const Corpus english = make_corpus(s.data, s.seed, s.english_bytes);
  const Corpus target = make_corpus(fs::path(s.data) / s.target, s.seed, s.target_bytes);
  std::printf("text_lora: English %zu fortunes (%zu + %zu bytes), %s %zu fortunes (%zu + %zu bytes); %d threads%s\n",
              english.texts, english.train.size(), english.held_out.size(), s.target.c_str(), target.texts, target.train.size(),
              target.held_out.size(), s.threads, ranks.size() > 1 ? lora::detail::cat(" on each of ", ranks.size(), " ranks").c_str() : "");
  ranks.shard(s.batch);  // a batch the ranks cannot share fails here, before anything is written
  const Ids english_held = tiled_windows(english.held_out, s.T, s.eval_windows);
  const Ids target_held = tiled_windows(target.held_out, s.T, s.eval_windows);
  const std::string pretrained = s.out + "/pretrained", checkpoints = s.out + "/checkpoints";
  Resumable res;
  res.every = s.checkpoint_every;
  res.max_steps = s.max_steps;
  if (s.resume.empty() && ranks.writer()) {  // a new run: earlier runs' checkpoints go
    fs::remove_all(checkpoints);
    write_json(s.out + "/run.json", settings_json(s));
  }
  ranks.barrier();
  std::vector<Run> runs;
  bool ok = true;
  const std::vector<Method> methods = all_methods();
  const Eigen::Index latency_windows = s.quick ? 4 : 16;
  const int latency_passes = s.quick ? 2 : 5;
  std::ofstream samples;
  try {
    pretrain(s, english, english_held, pretrained, checkpoints, res, ranks);

    const Model base(pretrained);
    const double base_english = bits_per_byte(base, english_held, s.batch), base_target = bits_per_byte(base, target_held, s.batch);
    std::printf("pre-trained model (%lld parameters): held-out bits per byte English %.3f, %s %.3f\n",
                static_cast<long long>(base.base_parameters()), base_english, s.target.c_str(), base_target);
    if (ranks.writer()) samples.open(s.out + "/samples.txt");
    const std::string before = sample(base, s, s.seed);
    samples << "== pre-trained\n" << before << "\n";
    std::printf("sample before: %s\n", before.c_str());

    for (const Method& m : methods) {
      const std::string phase = checkpoints + "/" + m.key;
      Run run;
      if (fs::exists(phase + "/done.json")) {  // finished before a resume
        run = run_from_json(read_json(phase + "/done.json"), phase + "/done.json");
        res.taken += s.steps;
      } else {
        // The heap from here on is the method's: its model, gradients, optimizer state, activations.
        const double heap_before = double(demo::heap::live());
        demo::heap::reset_peak();
        MethodModel made(m, pretrained, s.seed, lora::latest_training_checkpoint(phase));
        Model& model = made.model();
        run.name = m.name;
        run.key = m.key;
        run.trainable = long(model.trainable_parameters());
        run.before = base_target;
        train(model, s, target.train, target_held, m.lr, s.steps, run, phase, [&](const std::string& d) { made.write(d); }, res,
              ranks);
        run.heap_mib = (run.heap_peak - heap_before) / (1024.0 * 1024.0);
        run.english = bits_per_byte(model, english_held, s.batch);
        run.text = sample(model, s, s.seed);
        const lora::Mat<float> trained = model.forward(target_held.topRows(1));
        auto agrees = [&](const char* what) {  // after a merge or a fold: the same logits
          const double diff = (model.forward(target_held.topRows(1)) - trained).cwiseAbs().maxCoeff();
          if (diff > 1e-3) std::printf("  %s: the logits moved by %.2e\n", what, diff);
          return diff <= 1e-3;
        };
        if (m.kind == Kind::prefix) {
          model.methods().fold_prefix();  // the MLP goes; the keys and values stay
          run.merge_ok = agrees("prefix MLP folded away");
        }
        const Latency plain = latency(model, base, target_held, latency_windows, latency_passes);
        run.latency_ms = plain.ms;
        run.latency_ratio = plain.ms / plain.base_ms;
        if (ranks.writer()) made.write(s.out + "/" + (m.kind == Kind::lora ? "adapter_" : "") + m.key);
        if (m.kind == Kind::lora) {
          model.modules().merge();
          run.merge_ok = agrees("merged");
          run.unmerged_latency_ms = run.latency_ms;
          run.unmerged_latency_ratio = run.latency_ratio;
          const Latency merged = latency(model, base, target_held, latency_windows, latency_passes);
          run.latency_ms = merged.ms;
          run.latency_ratio = merged.ms / merged.base_ms;
        }
        if (ranks.writer()) {
          write_json(phase + "/done.json", to_json(run));
          for (const auto& [step, ck] : lora::training_checkpoints(phase)) fs::remove_all(ck);
        }
        ranks.barrier();
      }
      samples << "== " << m.name << "\n" << run.text << "\n";
      std::printf("%-26s %7ld trainable  %s %.3f -> %.3f bits/byte, English %.3f  %6.0f tokens/s  heap %.1f MiB  %.0f s\n",
                  m.name.c_str(), run.trainable, s.target.c_str(), run.before, run.after, run.english, run.tokens_per_s, run.heap_mib,
                  run.seconds);
      std::printf("  latency per example (%lld bytes, batch 1): %.3f ms, %+.1f %% against the base model",
                  static_cast<long long>(s.T), run.latency_ms, 100 * (run.latency_ratio - 1));
      if (run.unmerged_latency_ms > 0) std::printf(" (merged; unmerged %.3f ms, %+.1f %%)", run.unmerged_latency_ms, 100 * (run.unmerged_latency_ratio - 1));
      std::printf("\n");
      std::printf("  sample: %s\n", run.text.c_str());
      ok = ok && run.merge_ok && run.after < run.before;
      runs.push_back(run);
    }
  } catch (const Stopped&) {
    std::printf("text_lora: stopped after %ld optimizer steps (--max-steps); continue with --resume %s\n", res.taken, s.out.c_str());
    return 0;
  }
  if (!ranks.writer()) return 0;  // the rest reads rank 0's adapters and writes its files

  std::ofstream csv(s.out + "/results.csv");
  csv << "method,step,heldout_bits_per_byte,trainable_parameters,english_bits_per_byte,tokens_per_s,heap_mib,latency_ms,"
         "latency_vs_base,unmerged_latency_ms\n";
  Panel loss{"training loss (" + s.target + ")", "bits per byte", {}}, held{"held-out (" + s.target + ")", "bits per byte", {}};
  for (Run& r : runs) {
    for (std::size_t i = 0; i < r.held.x.size(); ++i)
      csv << r.key << "," << r.held.x[i] << "," << r.held.y[i] << "," << r.trainable << ","
          << (i + 1 == r.held.x.size() ? std::to_string(r.english) : "") << "," << r.tokens_per_s << "," << r.heap_mib << ","
          << r.latency_ms << "," << r.latency_ratio << "," << (r.unmerged_latency_ms > 0 ? std::to_string(r.unmerged_latency_ms) : "")
          << "\n";
    r.train.name = r.held.name = r.name;
    loss.curves.push_back(r.train);
    held.curves.push_back(r.held);
  }
  write_svg(s.out + "/curves.svg", {loss, held}, "step");
  // Serving: both adapters loaded by name into one model of every linear; one batch whose
  // sequences use the base, the q,v adapter and the all-linears adapter, in one unmerged pass.
  {
    lora::PeftConfig all;
    for (const Method& m : methods)
      if (m.key == "lora_all") all.target_modules = m.targets;
    Model served(pretrained, &all);
    for (const char* key : {"lora_qv", "lora_all"}) {
      lora::LoadOptions o;
      o.adapter_name = key;
      o.strict = false;  // the q,v adapter fills only q_proj and v_proj
      served.load_adapter(s.out + "/adapter_" + std::string(key), o);
    }
    lora::GenerationConfig g;
    g.max_new_tokens = int(std::min<Eigen::Index>(s.sample_bytes, s.T - 2));
    g.temperature = 0.8;
    g.top_k = 40;
    g.seed = s.seed;
    g.stop_tokens = {kEos};
    g.adapters = {"__base__", "lora_qv", "lora_all"};
    const auto out = lora::generate(served, {{kBos, 'D'}, {kBos, 'D'}, {kBos, 'D'}}, g);
    std::printf("one mixed batch (prompt \"D\"), each sequence its own adapter:\n");
    for (std::size_t i = 0; i < out.size(); ++i) {
      const std::string text = "D" + decode(out[i]);
      std::printf("  %-9s %s\n", g.adapters[i].c_str(), text.substr(0, text.find('\n')).c_str());
      samples << "== mixed batch, " << g.adapters[i] << "\n" << text << "\n";
    }
  }
  std::printf("wrote %s/results.csv, curves.svg, samples.txt, head_only/, adapter_lora_qv/, adapter_lora_all/, full/, "
              "adapter_tuning/, prefix_tuning/, ladder/\n", s.out.c_str());
  if (!ok) {
    std::printf("text_lora: FAILED (a method did not lower the held-out bits per byte, or merging or folding changed the logits)\n");
    return 1;
  }
  std::printf("text_lora: ok\n");
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "text_lora: %s\n", e.what());
  return 2;
}
