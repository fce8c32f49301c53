"""Experiment only (not in the package): moco-train with the key view's span ratio from KEY_RATIO=min,max."""
import dataclasses, os, sys
from moco_engine.data import text as T
kmin, kmax = map(float, os.environ["KEY_RATIO"].split(","))
def views(self, items, epoch):
    starts, lengths = self.stream.chunks(self.seed, epoch)
    keys = T.item_keys(self.seed, epoch, items)
    specs = (self.spec, dataclasses.replace(self.spec, ratio_min=kmin, ratio_max=kmax))
    return tuple(T.span_views(self.stream.ids, starts[items], lengths[items], keys, v, specs[v],
                              self.stream.chunk_length, self.width, self.host_lengths) for v in (0, 1))
T.TextTwoViews.views = views
from moco_engine.tools.cli import train_main
sys.exit(train_main(sys.argv[1:]))
